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
    """Run main: a user error is one `error:` line and exit 2; the GPU running out of memory inside the budget (the
    memory plan fell short: a bug, not the user's) one line naming it and the workaround, exit 1."""
    import torch
    try:
        main()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: the GPU ran out of memory inside the budget the run planned ({first}); this is the memory "
              "plan's fault: a larger --gpu-memory (or a smaller --max-batch-size / --max-seq-len) works around it",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
