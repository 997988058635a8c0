"""``mergekit-com``: ``mergekit-yaml`` with Chain of Merges registered.

Same arguments and flags as ``mergekit-yaml`` (it *is* mergekit's command),
plus ``--resume`` and ``--push-to-hub ORG/NAME [--private]``. Mistakes in the
config file, the models or the calibration data print one line instead of a
traceback (add ``-v`` to see the traceback).
"""

from __future__ import annotations

import sys
from typing import List, Optional

import click

RESUME_HELP = (
    "Only continue the interrupted merge whose work directory (OUT_PATH.com-work) is next "
    "to OUT_PATH; without this flag an interrupted merge is continued too, and a new one "
    "is started if there is none"
)


def _command(seen: dict) -> click.Command:
    """mergekit's ``mergekit-yaml`` command with ``--resume`` and ``--push-to-hub`` added."""
    from mergekit.scripts.run_yaml import main as run_yaml

    from mergekit_com.errors import MergeInputError
    from mergekit_com.integration.staged_merge import RESUME_ONLY
    from mergekit_com.io import hub_upload

    def callback(resume: bool, push_to_hub: Optional[str], private: bool, **kwargs):
        seen["config_file"] = kwargs.get("config_file")
        if private and not push_to_hub:
            raise MergeInputError("--private applies to --push-to-hub; add --push-to-hub org/name")
        if push_to_hub:
            hub_upload.check_push(push_to_hub)  # before any work
        _check_config_file(kwargs.get("config_file"))
        token = RESUME_ONLY.set(resume)
        try:
            run_yaml.callback(**kwargs)
        finally:
            RESUME_ONLY.reset(token)
        if push_to_hub:
            url = hub_upload.push(kwargs["out_path"], push_to_hub, private)
            click.echo(f"uploaded {kwargs['out_path']} to {url}")

    extra = [
        click.Option(["--resume"], is_flag=True, default=False, help=RESUME_HELP),
        click.Option(["--push-to-hub"], metavar="ORG/NAME", default=None,
                     help="After a successful merge, upload the output folder to this Hub "
                          "model repository (created if needed; needs a token)"),
        click.Option(["--private"], is_flag=True, default=False,
                     help="With --push-to-hub: create the repository as private"),
    ]
    return type(run_yaml)(
        name="mergekit-com", callback=callback, params=[*run_yaml.params, *extra],
        help=run_yaml.help,
    )


def _check_config_file(config_file: Optional[str]) -> None:
    """mergekit's config validators raise RuntimeError (not a pydantic error) for some
    mistakes, e.g. `models: []`; say those in one line too."""
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_com.errors import MergeInputError

    if not config_file:
        return
    with open(config_file, encoding="utf-8") as fp:
        data = yaml.safe_load(fp)  # a YAML error is reported by main()
    try:
        MergeConfiguration.model_validate(data)
    except (RuntimeError, AssertionError) as e:
        raise MergeInputError(
            f"config file {config_file} is not a valid mergekit config: "
            f"{str(e).strip() or type(e).__name__}") from None


def _config_error(config_file: Optional[str], error: Exception) -> str:
    """One line for a config file that is not valid YAML or not a mergekit config."""
    import pydantic
    import yaml

    where = f"config file {config_file}"
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        return f"{where} is not valid YAML ({problem}{at})"
    assert isinstance(error, pydantic.ValidationError)
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "top level"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where} is not a valid mergekit config: {loc}: {first['msg']}{more}"


def _bad_shard_size(args: List[str]) -> Optional[str]:
    """The value of ``--out-shard-size`` if mergekit cannot read it (its option callback
    raises a plain ValueError, which click shows as a traceback)."""
    from mergekit.common import parse_kmb

    for i, arg in enumerate(args):
        if arg == "--":
            return None
        if arg.startswith("--out-shard-size"):
            value = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
            if value is None:
                return None  # click says the value is missing
            try:
                parse_kmb(value)
            except (ValueError, IndexError):
                return value
    return None


def main(argv: Optional[List[str]] = None) -> None:
    import mergekit_com  # noqa: F401  (registers chain_of_merges)
    import pydantic
    import yaml

    from mergekit_com.errors import MergeInputError, one_line

    args = sys.argv[1:] if argv is None else argv
    verbose = any(a == "-v" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)

    def fail(message: str, code: int = 2):
        print(f"mergekit-com: error: {one_line(message)}", file=sys.stderr)
        sys.exit(code)

    bad_size = _bad_shard_size(args)
    if bad_size is not None:
        fail(f"--out-shard-size {bad_size!r} is not a size: give a whole number of parameters, "
             "optionally with K, M or B (for example 500M)")
    seen: dict = {}
    try:
        _command(seen).main(args=args, prog_name="mergekit-com", standalone_mode=False)
    except MergeInputError as e:  # a ClickException too: must come first
        if verbose:
            raise
        fail(e.message, e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort as e:  # Ctrl-C or SIGTERM; the work directory was logged
        from mergekit_com.errors import Terminated

        if isinstance(e.__cause__, Terminated):
            fail("terminated (SIGTERM); run the same command again to continue", 143)
        fail("interrupted; run the same command again to continue", 130)
    except (yaml.YAMLError, pydantic.ValidationError) as e:
        if verbose:
            raise
        fail(_config_error(seen.get("config_file"), e))
    except OSError as e:  # unreadable config file, full disk, ...
        if verbose:
            raise
        fail(str(e))


if __name__ == "__main__":
    main()
