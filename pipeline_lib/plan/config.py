"""Load and validate a grid config: JSON schema first, then the checks a schema cannot express.

Every error names the field (``layouts.tp_2.mesh``) or the file, and is raised before any job runs.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jsonschema

from pipeline_lib import frameworks, models
from pipeline_lib.common import name_rule
from pipeline_lib.plan import axes
from pipeline_lib.plan.schema import (  # noqa: F401 - the config's names for them
    ConfigError,
    config_hash,
    job_inputs,
    load_schema,
    read_yaml,
)
from pipeline_lib.verify import faults


def load(path: str | Path) -> dict:
    """Read a YAML config file and validate it (defaults filled in)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return validate(read_yaml(text, str(path)), source=str(path))


def _is_integer(_checker, value) -> bool:
    """JSON Schema's "integer" takes 2.0 too; a mesh size or a step count must be an int."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(_checker, value) -> bool:
    """A finite number: NaN passes every minimum, infinity every maximum."""
    return _is_integer(_checker, value) or (isinstance(value, float) and math.isfinite(value))


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number}
    ),
)


def _message(error: jsonschema.ValidationError) -> str:
    value = error.instance
    axis = error.absolute_path[0] if error.absolute_path else None
    if error.validator == "enum" and axis in axes.AXES:
        return f"unknown {axis} {value!r} (known: {', '.join(axes.AXES[axis])})"
    if error.validator == "type" and isinstance(value, float):
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        return f"{value} is not an integer"
    if error.validator == "type" and error.validator_value == "boolean" and isinstance(value, str):
        # Snakemake's --config reads True and False as booleans, any other word as a string.
        return f"{value!r} is not a boolean (true or false; on Snakemake's --config: True or False)"
    return error.message


def validate(raw: Any, source: str = "config") -> dict:
    """Return a validated copy of ``raw`` with defaults filled in, or raise ConfigError."""
    schema = load_schema()
    config = copy.deepcopy(raw) if raw is not None else {}
    if renamed := axes.renamed_keys(config):
        raise ConfigError(_joined(renamed, source))
    if isinstance(config, dict):
        _fill_defaults(config, schema)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: [str(p) for p in e.path])
    if errors:
        raise ConfigError(
            _joined([f"{_field(e.absolute_path)}: {_message(e)}" for e in errors], source)
        )
    for entry in config["checkpoints"].values():  # defaults of a mapping's values
        entry.setdefault("format", "dcp")
        entry.setdefault("naming", checkpoint_naming(entry["format"]))
    _check_semantics(config, source)
    return config


def error_lines(exc: ConfigError) -> list[str]:
    """The errors of a ConfigError, one line each (without the 'invalid config:' heading)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines()]
    return [line for line in lines if line and line != "invalid config:"]


def _joined(errors: list[str], source: str) -> str:
    """One ConfigError message: a heading, then one line per error (its whitespace collapsed)."""
    return "invalid config:\n  " + "\n  ".join(f"{source}: {' '.join(e.split())}" for e in errors)


def _field(path) -> str:
    """``layouts.tp_2.mesh``; a part that is not a plain name is quoted (``layouts.'a b'``)."""
    parts = [str(p) if not name_rule.name_error(str(p), model=True) else repr(p) for p in path]
    return ".".join(parts) or "(top level)"


def _fill_defaults(node: dict, schema: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if isinstance(node.get(key), dict) and "properties" in sub:
            _fill_defaults(node[key], sub)


def _check_semantics(config: dict, source: str) -> None:
    """Every error beyond the schema, one line each (ConfigError), names first: a name that
    cannot become a path is not imported or expanded any further."""
    errors = []
    if not config["models"] and not config["faults"]:
        errors.append("models: the grid is empty (no models and no faults)")
    if config["pairs"] == "none" and config["models"] and not config["checkpoints"]:
        errors.append("pairs: none saves nothing, and no checkpoints are named to load")
    errors += _name_errors(config)
    if errors:
        raise ConfigError(_joined(errors, source))
    errors += _hf_model_errors(config) + _titan_model_errors(config)
    named = {**config["hf_models"], **config["torchtitan_models"]}
    errors += [
        f"models.{i}: {error}"
        for i, name in enumerate(config["models"])
        if name not in named and (error := _model_error(name, models.names()))
    ]
    max_dp = 1
    for name, layout in config["layouts"].items():
        layout_errors, dp = _layout_errors(f"layouts.{name}", layout, config["run"])
        errors += layout_errors
        max_dp = max(max_dp, dp)
    errors += _unknown_pair_names(config, "pairs", config["layouts"], "layout")
    errors += _unknown_pair_names(
        config, "version_pairs", config["torch_versions"], "torch version"
    )
    errors += _axis_errors(config) + _fault_errors(config) + _checkpoint_errors(config)
    if config["train"]["global_batch"] < max_dp:
        errors.append(
            f"train.global_batch: {config['train']['global_batch']} is smaller than the largest "
            f"data-parallel degree {max_dp}; every data-parallel rank needs at least one sample"
        )
    if errors:
        raise ConfigError(_joined(errors, source))


def _layout_errors(where: str, layout: dict, run: dict) -> tuple[list[str], int]:
    """A layout's errors (framework, mesh, world size, nodes) and its data-parallel degree."""
    known = frameworks.names()
    if layout["framework"] not in known:
        unknown = f"unknown framework {layout['framework']!r} (known: {', '.join(known)})"
        return [f"{where}.framework: {unknown}"], 1
    fw, mesh = frameworks.get(layout["framework"]), layout["mesh"]
    if len(mesh) != len(fw.mesh_dims):
        return [
            f"{where}.mesh: framework {fw.name} needs {len(fw.mesh_dims)} mesh dim(s) "
            f"({', '.join(fw.mesh_dims)}), got {mesh}"
        ], 1
    errors, world = [], math.prod(mesh)
    if fw.max_world_size is not None and world > fw.max_world_size:
        errors.append(
            f"{where}.mesh: framework {fw.name} runs on at most {fw.max_world_size} "
            f"process(es), mesh {mesh} has {world}"
        )
    gpus_per_node = run["gpus_per_node"]
    if gpus_per_node and world % math.ceil(world / gpus_per_node):
        nodes = math.ceil(world / gpus_per_node)
        errors.append(
            f"{where}.mesh: world size {world} does not split evenly over {nodes} nodes of "
            f"run.gpus_per_node={gpus_per_node} (every node runs the same number of ranks)"
        )
    errors += _pipeline_errors(where, layout, fw)
    dims = fw.data_parallel_dims
    dp = math.prod(s for s, d in zip(mesh, fw.mesh_dims, strict=True) if d in dims)
    return errors, dp


def _pipeline_errors(where: str, layout: dict, fw) -> list[str]:
    """``schedule`` and ``microbatches`` name a pipeline-parallel framework's; 1F1B needs at
    least one microbatch per stage (torch's Schedule1F1B refuses fewer)."""
    if not fw.pp_dim:
        keys = [key for key in ("schedule", "microbatches") if key in layout]
        return [f"{where}.{key}: framework {fw.name} has no pipeline stages" for key in keys]
    stages = layout["mesh"][fw.mesh_dims.index(fw.pp_dim)]
    microbatches = layout.get("microbatches", frameworks.DEFAULT_MICROBATCHES)
    schedule = layout.get("schedule", frameworks.DEFAULT_PP_SCHEDULE)
    if schedule == "1f1b" and microbatches < stages:
        why = f"1f1b needs at least one per stage ({stages}), got {microbatches}"
        return [f"{where}.microbatches: {why}"]
    return []


def _axis_errors(config: dict) -> list[str]:
    errors = []
    if config["combine_axes"] == "pairwise" and config["engine"] != ["dcp"]:
        # engine torch_checkpointing runs the other axes' defaults only: a covering array with
        # it took minutes and 238 variants where 79 cover every other pair (2026-12-07)
        errors.append("engine: combine_axes pairwise covers engine dcp only (got engine: "
                      f"{config['engine']}); use product or one_at_a_time")  # fmt: skip
    elif config["combine_axes"] == "pairwise" and not axes.variants(config):
        errors.append("combine_axes: pairwise: no combination of the axes' values can run")
    if config["verify"].get("reference") == "sealed":
        staged = [
            name
            for name, layout in config["layouts"].items()
            if layout["framework"] in frameworks.names()
            and frameworks.get(layout["framework"]).pp_dim
        ]
        if staged:
            errors.append(
                f"layouts.{staged[0]}: a pipeline-parallel layout is checked against the saver's "
                "reference; verify.reference sealed writes none (use exact)"
            )
    sequences = [v for v in config["save_sequence"] if v != "once"]
    if sequences and config["verify"].get("reference") == "sealed":
        errors.append(
            f"save_sequence: {sequences[0]} is checked against the saver's reference at each "
            "step; verify.reference sealed writes none (use exact)"
        )
    return errors


def _fault_errors(config: dict) -> list[str]:
    errors, known_faults, known_models = [], ["all", *faults.FAULTS], models.names()
    for i, entry in enumerate(config["faults"]):
        if entry["fault"] not in known_faults:
            known = ", ".join(known_faults)
            errors.append(f"faults.{i}.fault: unknown fault {entry['fault']!r} (known: {known})")
        elif entry["fault"] not in ["all", *faults.campaign(config["verify"])]:
            stage = faults.FAULTS[entry["fault"]].stage
            why = "a save sequence" if stage == "sequence" else "breaks a seal"
            needs = "exact" if stage == "sequence" else "sealed"
            errors.append(
                f"faults.{i}.fault: {entry['fault']} {why} (needs verify.reference: {needs})"
            )
        if entry["model"] not in known_models:
            errors.append(f"faults.{i}.model: unknown model {entry['model']!r}")
        for key in ("save", "load"):
            if entry[key] not in config["layouts"]:
                errors.append(f"faults.{i}.{key}: unknown layout {entry[key]!r}")
    return errors


def _checkpoint_errors(config: dict) -> list[str]:
    """Existing checkpoints: a DCP folder (``.metadata`` in it), a model of ``models``, a
    naming that can be used, a name no layout has (both name a cell's save side)."""
    from pipeline_lib.verify.checkpoint_names import naming_error

    errors = []
    for name, entry in config["checkpoints"].items():
        where = f"checkpoints.{name}"
        if name in config["layouts"]:
            errors.append(f"{where}: a layout has this name too (both name a save side)")
        if error := checkpoint_folder_error(entry["path"], entry["format"]):
            errors.append(f"{where}.path: {error}")
        if entry["model"] not in config["models"]:
            errors.append(f"{where}.model: {entry['model']!r} is not one of models")
        if error := naming_error(entry["naming"]) or _format_naming_error(entry):
            errors.append(f"{where}.naming: {error}")
    return errors


def checkpoint_naming(fmt: str) -> str:
    """The naming of an existing checkpoint of format ``fmt`` that names none."""
    from pipeline_lib.verify import checkpoint_names, hf_folder

    return checkpoint_names.HUGGINGFACE if fmt == hf_folder.FORMAT else "dcp_matrix"


def _format_naming_error(entry: dict) -> str | None:
    """A Hugging Face folder holds the model's tensors under the model's own names: the
    built-in namings of other tools' full checkpoints would place none of them."""
    from pipeline_lib.verify import checkpoint_names, hf_folder

    if entry["format"] == hf_folder.FORMAT and entry["naming"] in ("dcp_matrix", "torchtitan"):
        return (
            f"{entry['naming']} names a DCP trainer checkpoint's entries; a {hf_folder.FORMAT} "
            f"folder's are the model's own names: {checkpoint_names.HUGGINGFACE} (its default) or "
            "a function of yours"
        )
    return None


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The files of an existing checkpoint's folder, below it at any depth (links to files
    included, links to folders not followed): its import job's inputs."""
    return [p for p in sorted(Path(folder).rglob("*")) if p.is_file()]


def checkpoint_folder_error(path: str, fmt: str = "dcp") -> str | None:
    """Why ``path`` is not an existing checkpoint's folder the grid can take, or None: it needs a
    ``.metadata`` that is a regular file inside it (not a link out of it: the import reads it),
    or for format hf_safetensors a ``model.safetensors`` or ``model.safetensors.index.json``
    (hf_folder.folder_error), and no file whose name Snakemake would read as a wildcard (``{``
    or ``}``: each file is an input of the import job). Reads no file."""
    from pipeline_lib.common.errors import printable
    from pipeline_lib.verify import hf_folder

    metadata = Path(path) / ".metadata"
    if fmt == hf_folder.FORMAT:
        if error := hf_folder.folder_error(path):
            return error
    elif metadata.exists() and not metadata.is_file():
        return f"{path!r}: its .metadata is not a regular file"
    elif not metadata.is_file():
        hint = ""
        if any((Path(path) / name).exists() for name in (hf_folder.SINGLE, hf_folder.INDEX)):
            hint = f"; it holds a Hugging Face folder's weights: format {hf_folder.FORMAT}"
        return f"{path!r} is not a DCP checkpoint folder (no .metadata in it{hint})"
    elif not metadata.resolve().is_relative_to(Path(path).resolve()):
        return f"{path!r}: its .metadata is a link to {str(metadata.resolve())!r}, outside it"
    for file in checkpoint_files(path):
        if "{" in file.name or "}" in file.name:
            name = printable(str(file.relative_to(path)))
            return (
                f"{path!r} holds a file whose name has {{ or }}, {name}: Snakemake would read it "
                "as a wildcard (rename or move it)"
            )
    return None


def _name_errors(config: dict) -> list[str]:
    """Names that become paths and wildcard values (pipeline_lib.common.name_rule), the torch
    environments' folder and requirements."""
    errors = [
        f"models.{i}: {error}"
        for i, name in enumerate(config["models"])
        if (error := name_rule.name_error(name, model=True))
    ]
    for key in ("layouts", "torch_versions", "checkpoints"):
        errors += [
            f"{key}: {error}" for name in config[key] if (error := name_rule.name_error(name))
        ]
    for i, entry in enumerate(config["faults"]):
        for key in ("model", "save", "load"):
            if error := name_rule.name_error(entry[key], model=key == "model"):
                errors.append(f"faults.{i}.{key}: {error}")
        # The cell's folder and wildcard value: <fault>.<model>.<save>.<load>.
        fault_names = list(faults.FAULTS) if entry["fault"] == "all" else [entry["fault"]]
        for fault in fault_names:
            if error := name_rule.periodic_error(f"{fault}.{entry['model']}.{entry['save']}."
                                             f"{entry['load']}"):  # fmt: skip
                errors.append(f"faults.{i}: fault cell {error}")
    if error := env_dir_error(config["run"]["torch_env_dir"]):
        errors.append(f"run.torch_env_dir: {error}")
    if config.get("baseline") and (error := baseline_error(config["baseline"])):
        errors.append(f"baseline: {error}")
    for name, requirement in config["torch_versions"].items():
        if error := requirement_error(requirement):
            errors.append(f"torch_versions.{name}: {error}")
    return errors


# Characters a shell, Snakemake's patterns ({wildcard}) or pip's options give a meaning to.
_SHELL_CHARACTERS = set(" \t\n\r;&|<>()$`\\\"'*?[]{}!#~^,=%")


def _argument_error(path: str) -> str | None:
    """Why a path cannot go into a rule's input and a shell command as it is, or None."""
    bad = sorted(set(path) & _SHELL_CHARACTERS) + sorted({c for c in path if not c.isprintable()})
    if bad:
        return f"{path!r} has characters a shell or Snakemake would interpret: {''.join(bad)!r}"
    if path.startswith("-"):
        return f"{path!r} starts with '-' (it would read as a command-line option)"
    return None


def baseline_error(path: str) -> str | None:
    """Why ``baseline`` is not usable, or None. It is only read (never written or deleted), so
    it may lie anywhere, but it becomes a rule input and a shell argument; and it is read now,
    whole and typed (pipeline_lib.plan.expectations.load_baseline), so that a file the gate
    cannot use stops the run before any job, not after the matrix ran."""
    if error := _argument_error(path):
        return error
    if Path(path).suffix not in (".yaml", ".yml", ".parquet"):
        return f"{path!r} is neither an expectations file (.yaml) nor a matrix (.parquet)"
    if not Path(path).is_file():
        return f"{path!r} is not a file"
    from pipeline_lib.plan.expectations import content_error

    return content_error(path)


def env_dir_error(path: str) -> str | None:
    """Why ``run.torch_env_dir`` is not usable, or None. A relative folder must stay inside the
    working directory (an absolute one may lie anywhere: see environments.make_env)."""
    if error := _argument_error(path):
        return error
    if not Path(path).is_absolute():
        try:
            name_rule.inside(path)
        except name_rule.UnsafePath as exc:
            return f"a relative folder must stay inside the working directory: {exc}"
    return None


def requirement_error(requirement: str) -> str | None:
    """Why a ``torch_versions`` value is not a PEP 508 requirement of the package torch (no
    URL, no environment marker), or None."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        parsed = Requirement(requirement)
    except InvalidRequirement as exc:
        return f"{requirement!r} is not a pip requirement: {' '.join(str(exc).split())[:200]}"
    if canonicalize_name(parsed.name) != "torch":
        return f"{requirement!r} names the package {parsed.name!r}, not torch"
    if parsed.url:
        return f"{requirement!r} is a URL requirement (give a version: torch==X.Y.Z)"
    if parsed.marker:
        return f"{requirement!r} has an environment marker ({parsed.marker}); give a version only"
    return None


def _model_error(name: str, known_models: list[str]) -> str | None:
    """Why ``name`` is not a usable model: unknown, or an import path that does not import or
    lacks the contract (imports the user's module, and so torch, now: before any job runs)."""
    if models.is_import_path(name):
        try:
            models.get(name)
        except models.UserModelError as exc:
            return str(exc)
        return None
    if name not in known_models:
        known = ", ".join(known_models)
        return f"unknown model {name!r} (known: {known}; or your own: package.module:callable)"
    return None


def _hf_model_errors(config: dict) -> list[str]:
    """Errors of the ``hf_models`` entries (imports transformers, only when there are some)."""
    if not config["hf_models"]:
        return []
    errors = [
        f"hf_models.{name}: {name!r} is a built-in model's name"
        for name in config["hf_models"]
        if name in models.names()
    ]
    try:
        from pipeline_lib.models import _hf
    except ImportError as exc:
        return [*errors, f"hf_models: cannot import transformers: {exc}"]
    for name, entry in config["hf_models"].items():
        if error := _hf.definition_error(entry) or _lora_error(entry):
            errors.append(f"hf_models.{name}.{error}")
    return errors


def _lora_error(entry: dict) -> str | None:
    """Why an ``hf_models`` entry's LoRA adapters cannot apply (imports peft: only for an entry
    with some)."""
    if not entry.get("lora"):
        return None
    from pipeline_lib.models import _hf, _lora

    return _lora.definition_error(_hf.HFModelDefinition.from_dict(entry))


def _titan_model_errors(config: dict) -> list[str]:
    """Errors of the ``torchtitan_models`` entries (imports torchtitan, only when there are
    some): a name another model has, a model or flavor torchtitan lacks."""
    if not config["torchtitan_models"]:
        return []
    errors = [
        f"torchtitan_models.{name}: {name!r} is a built-in or hf_models model's name"
        for name in config["torchtitan_models"]
        if name in models.names() or name in config["hf_models"]
    ]
    try:
        import torchtitan  # noqa: F401 - the optional extra: one line when it is missing

        from pipeline_lib.models import _torchtitan
    except ImportError as exc:
        why = f"cannot import torchtitan ({exc}): bash scripts/setup.sh --torchtitan"
        return [*errors, f"torchtitan_models: {why}"]
    for name, entry in config["torchtitan_models"].items():
        if error := _torchtitan.definition_error(entry):
            errors.append(f"torchtitan_models.{name}.{error}")
    return errors


def _unknown_pair_names(config: dict, key: str, known, what: str) -> list[str]:
    """Errors for the names in a list of [save, load] pairs (``pairs``, ``version_pairs``)."""
    pairs = config[key] if isinstance(config[key], list) else []
    return [
        f"{key}.{i}.{j}: unknown {what} {name!r}"
        for i, pair in enumerate(pairs)
        for j, name in enumerate(pair)
        if name not in known
    ]
