"""The command line of a job: `--config FILE.yaml` plus `--section.field VALUE` flags, read into a
root dataclass (`JobConfig`, or a subclass that adds sections, as fine-tuning does).

Every field of the root that holds a dataclass is a section; every field of a section is a flag and
a YAML key, and its docstring in the class body is its `--help` text (read from the source, as tyro
does for torchtitan's job_config.py). A `ModelSection` is special: its `preset` plus any
`ModelConfig` field, which become the section's overrides. Precedence: field defaults < the YAML
file < command-line flags. Errors are ValueErrors naming the file, line and field.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, TypeVar

from molm_megatron.config import JobConfig, ModelConfig, ModelSection

Job = TypeVar("Job", bound=JobConfig)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it in the class body (its `--help` text); a subclass
    inherits the docstrings of its bases' fields."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_types(cls: type) -> dict[str, str]:
    """Field name -> annotation as written ('int', 'list', ...); the config uses postponed annotations."""
    return {f.name: f.type for f in dataclasses.fields(cls)}


def section_types(root: type) -> dict[str, type]:
    """Section name -> its dataclass, for every dataclass-valued field of the root."""
    out = {}
    for f in dataclasses.fields(root):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out[f.name] = f.default_factory
    return out


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce(value, kind: str, path: str, where: str):
    """Convert a YAML or command-line value to the field's type; ValueError names where and the field."""
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE + _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            if isinstance(value, (list, dict)):
                raise ValueError
            return str(value)
        if kind.startswith("list["):
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_coerce(item, kind[5:-1], path, where) for item in items]
    except (TypeError, ValueError):
        raise ValueError(f"{where}{path}: expected {kind}, got {value!r}") from None
    raise AssertionError(f"unhandled field type {kind} of {path}")


def _yaml_tree(path: str) -> tuple[dict, dict[str, int]]:
    """The YAML file as nested dicts plus the line number (1-based) of every `section.field` key."""
    import yaml

    try:
        f = open(path)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read the file ({e.strerror})") from None
    with f:
        try:
            root = yaml.compose(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"{path}:{root.start_mark.line + 1}: the top level must be a mapping of sections")
    tree, lines = {}, {}
    for key_node, section_node in root.value:
        section = key_node.value
        lines[section] = key_node.start_mark.line + 1
        if not isinstance(section_node, yaml.MappingNode):
            raise ValueError(f"{path}:{lines[section]}: section {section!r} must be a mapping of fields")
        tree[section] = {}
        for field_key, value_node in section_node.value:
            lines[f"{section}.{field_key.value}"] = field_key.start_mark.line + 1
            tree[section][field_key.value] = yaml.safe_load(yaml.serialize(value_node))
    return tree, lines


def _apply(job: JobConfig, sections: dict[str, type], section: str, name: str, value, where: str) -> None:
    """Set `section.name` on the job (model fields other than `preset` become overrides)."""
    if section not in sections:
        raise ValueError(f"{where}unknown section {section!r}; known: {', '.join(sections)}")
    is_model = issubclass(sections[section], ModelSection)
    if is_model and name != "preset":
        types = _field_types(ModelConfig)
        if name not in types:
            raise ValueError(f"{where}unknown field {section}.{name} (not a ModelConfig field)")
        getattr(job, section).overrides[name] = _coerce(value, types[name], f"{section}.{name}", where)
        return
    types = _field_types(sections[section])
    if name not in types or (is_model and name == "overrides"):
        raise ValueError(f"{where}unknown field {section}.{name}; known: {', '.join(types)}")
    setattr(getattr(job, section), name, _coerce(value, types[name], f"{section}.{name}", where))


def build_arg_parser(root: type[Job] = JobConfig, prog: str = "pretrain.py") -> argparse.ArgumentParser:
    """The `--config FILE.yaml` plus `--section.field VALUE` parser of `root`; help texts are the
    docstrings, the description is the root's docstring (first paragraph)."""
    summary = " ".join((root.__doc__ or "").split("\n\n")[0].split())
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [-h] [--config FILE.yaml] [--section.field VALUE ...]",
        description=f"{summary} Settings come from the dataclasses of molm_megatron/config.py: defaults, then "
                    "the YAML file (the same section/field tree), then --section.field flags. Runs as one "
                    "process, under torchrun or under the deepspeed launcher.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with the same sections and fields")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    for section, cls in section_types(root).items():
        group = parser.add_argument_group(f"{section}: {cls.__doc__.splitlines()[0].rstrip('.')}")
        docs, types = field_docs(cls), _field_types(cls)
        defaults = {k: repr(v) for k, v in dataclasses.asdict(cls()).items()}
        if issubclass(cls, ModelSection):
            docs = {"preset": docs["preset"], **field_docs(ModelConfig)}
            types = {"preset": "str", **_field_types(ModelConfig)}
            defaults = {"preset": repr(cls().preset), **{k: "the preset's" for k in types if k != "preset"}}
        for name, kind in types.items():
            if name == "overrides":
                continue
            help_text = f"{docs.get(name, '')} [{kind}; default: {defaults[name]}]".replace("%", "%%")
            group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}",
                               metavar=kind.split("[")[-1].rstrip("]").upper(),
                               nargs="+" if kind.startswith("list[") else None, help=help_text)
    return parser


def parse_job_config(argv: list[str], root: type[Job] = JobConfig, prog: str = "pretrain.py") -> Job:
    """Build and validate a `root` job from a command line (without the program name).

    ValueError (naming the file, line and field) on bad input; `--help` prints and exits 0.
    """
    args = vars(build_arg_parser(root, prog).parse_args(argv))
    job = root()
    sections = section_types(root)
    if "config" in args:
        tree, lines = _yaml_tree(args["config"])
        for section, fields in tree.items():
            if section not in sections:
                raise ValueError(f"{args['config']}:{lines[section]}: unknown section {section!r}; known: "
                                 f"{', '.join(sections)}")
            for name, value in fields.items():
                line = lines.get(f"{section}.{name}", lines.get(section))
                _apply(job, sections, section, name, value, f"{args['config']}:{line}: ")
    for key, value in args.items():
        if "." in key:
            section, name = key.split(".", 1)
            _apply(job, sections, section, name, value, f"--{key}: ")
    job.validate()
    return job


def run_job(argv: list[str], root: type[Job], prog: str, build: Callable[[Job], Any]) -> int:
    """What a training entry point does: parse the command line (a bad setting prints usage and
    the message, exit 2), set up logging, `build(job)` the trainer (a ValueError there, from
    world-dependent settings, starting weights or data, is a one-line error, exit 2), train,
    close. Returns the trainer's exit code (0 finished, 75 preempted, 3 non-finite)."""
    import logging
    import sys

    try:
        job = parse_job_config(argv, root=root, prog=prog)
    except ValueError as e:
        build_arg_parser(root, prog).error(str(e))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    name = prog.removesuffix(".py")
    for logger_name in ("molm_megatron", name):  # our progress lines; libraries stay at warnings
        logging.getLogger(logger_name).setLevel(logging.INFO)
    try:
        trainer = build(job)
    except ValueError as e:
        logging.getLogger(name).error("error: %s", e)
        return 2
    try:
        return trainer.train()
    finally:
        trainer.close()
