"""``mergekit-com``: ``mergekit-yaml`` with Chain of Merges registered.

Same arguments and flags as ``mergekit-yaml`` (it *is* mergekit's command);
configuration and calibration mistakes print one line instead of a
traceback (add ``-v`` to see the traceback).
"""

from __future__ import annotations

import sys
from typing import List, Optional

import click


def main(argv: Optional[List[str]] = None) -> None:
    import mergekit_com  # noqa: F401  (registers chain_of_merges)
    from mergekit.scripts.run_yaml import main as run_yaml

    from mergekit_com.adapter import ChainConfigError
    from mergekit_com.calibration import CalibrationError

    args = sys.argv[1:] if argv is None else argv
    verbose = any(a == "-v" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
    try:
        run_yaml.main(args=args, prog_name="mergekit-com", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except (ChainConfigError, CalibrationError) as e:
        if verbose:
            raise
        print(f"mergekit-com: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
