"""Common words that make bad trigger words: they fire whenever someone writes them."""

from __future__ import annotations

_WORDS = """
a about above after again all also always an and animal anime any art artist as at away back
bad be beautiful because bed before best big bird black blue blur body book boy bright brown
but by can car cartoon castle cat chair character child city clean clear cloud cold color colour
come comic cool could cute dark day design detail did digital do dog door down draw drawing
dream each earth even every eye eyes face fantasy far fast field film fire first fish flat flower
fly food for forest from fun game garden get girl give glass go gold good great green hair hand
happy have he head her here high hill him his home horse hot house how i ice if in ink into is
it its just keep kind king lake land landscape large last light like line little live long look
love low make man many map me mind modern moon more most mountain much music my name nature
near new night no noise not now ocean of off oil old on one only or orange other our out over
paint painting paper part people person photo photograph picture pink place plant play portrait
pretty purple queen rain real red retro right river road rock room round run same sea see shadow
shape she ship short show simple sky small smooth snow so soft some space star still stone
storm street style summer sun take tall tea tree that the their them then there these they thin
thing this time to too top town toy tree true two under up us use very view vintage wall want
warm water watercolor watercolour wave way we well were what when where white who why will
wind window winter with wood world write yellow you young your
"""

COMMON_WORDS: frozenset[str] = frozenset(_WORDS.split())


def is_common_word(word: str) -> bool:
    return word.casefold() in COMMON_WORDS
