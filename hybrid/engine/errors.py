"""Entry-script wrapper: known user errors become one clear line and exit code 2, never a deep stack trace."""
from __future__ import annotations

import sys
from typing import Callable

from ..model.checkpoint import CheckpointError
from ..model.config import ConfigError


def user_errors() -> tuple[type, ...]:
    from ..offload.budget import BudgetError
    from .engine import EngineError
    return (CheckpointError, ConfigError, EngineError, BudgetError, FileNotFoundError)


def friendly(main: Callable[[], None]) -> None:
    try:
        main()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
