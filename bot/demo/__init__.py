"""`atelier demo`: the whole story on the built-in tiny model, ending in an HTML report."""

from bot.demo.story import (
    DEFAULT_STEPS,
    DemoError,
    DemoOptions,
    DemoResult,
    demo_settings,
    main,
    run_demo,
)

__all__ = [
    "DEFAULT_STEPS",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "demo_settings",
    "main",
    "run_demo",
]
