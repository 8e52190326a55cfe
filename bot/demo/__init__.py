"""`atelier demo`: the whole story on the built-in toy-sd15, ending in an HTML report."""

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
