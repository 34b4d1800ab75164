"""echolab's public entry points for use from other code (the `echolab` command is experiments.cli).

    from echolab import CollapseCallback   # format-collapse recording and stopping for TRL's GRPOTrainer

Imported on first use: `import echolab` stays light.
"""

from __future__ import annotations

__all__ = ["CollapseCallback"]


def __getattr__(name: str):
    if name == "CollapseCallback":
        from experiments.trl_callback import CollapseCallback

        return CollapseCallback
    raise AttributeError(f"module 'echolab' has no attribute {name!r}")
