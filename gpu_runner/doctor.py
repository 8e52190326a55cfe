"""`python -m gpu_runner.doctor`: the runner's half of `atelier doctor`.

Checks what only the runner's environment can answer: torch and the runner packages, the
device the runner would use, and each base model's source (and, with --load-models, that it
loads). `atelier doctor` runs this in a subprocess with --json, so the bot process never
imports torch. Source checks touch only the file system and the local Hugging Face cache;
diffusers is imported only for --load-models.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from gpu_runner.lora_import import FAMILY_LABELS, LoraImportError, read_safetensors_header
from storage.families import BUILTIN_MODELS as BUILTIN
from storage.settings import ConfigError, Settings, load_settings

Status = Literal["ok", "fail", "skip"]
SourceKind = Literal["builtin", "folder", "single_file", "hub"]

# The one list (storage.families); gpu_runner.pipelines would import diffusers (~7 s).
BUILTIN_MODELS = tuple(BUILTIN)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RUNNER_PACKAGES = ("diffusers", "transformers", "peft", "accelerate", "safetensors")
TORCH_HELP = "https://pytorch.org/get-started/locally/"
_MARKS = {"ok": "ok", "fail": "FAIL", "skip": "--"}  # plain ASCII: also read in docker logs


@dataclass(frozen=True)
class RunnerCheck:
    name: str
    status: Status
    detail: str
    fix: str = ""


class SourceError(ValueError):
    """A base model's source is not usable; str() says why."""


# --- torch and the device -------------------------------------------------------------


def package_check() -> RunnerCheck:
    missing = [name for name in RUNNER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return RunnerCheck(
            "runner packages",
            "fail",
            f"not installed: {', '.join(missing)}",
            "install the runner extra: ./install.sh (or pip install '.[runner]')",
        )
    return RunnerCheck("runner packages", "ok", ", ".join(RUNNER_PACKAGES) + " installed")


def torch_check() -> RunnerCheck:
    try:
        import torch
    except Exception as exc:  # a broken install raises more than ImportError
        return RunnerCheck(
            "torch",
            "fail",
            f"cannot be imported ({type(exc).__name__}: {exc})",
            f"install torch: ./install.sh, or the build for your GPU from {TORCH_HELP}",
        )
    version = torch.__version__
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return RunnerCheck("torch", "ok", f"{version} ({build})")


def _nvidia_gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and b"GPU" in done.stdout


def device_check(settings: Settings) -> RunnerCheck:
    try:
        import torch

        from gpu_runner.devices import DeviceError, resolve_device
    except Exception:
        return RunnerCheck("device", "skip", "skipped: torch cannot be imported")
    try:
        choice = resolve_device(settings.device)
    except DeviceError as exc:
        return RunnerCheck(
            "device",
            "fail",
            f"ATELIER_DEVICE={settings.device}: {exc}",
            "set ATELIER_DEVICE=auto (or cpu), or ATELIER_DTYPE to fp32, fp16 or bf16",
        )
    dtype = str(choice.dtype).removeprefix("torch.")
    if choice.kind == "cuda":
        props = torch.cuda.get_device_properties(choice.torch_device)
        gib = props.total_memory / 1024**3
        return RunnerCheck("device", "ok", f"{choice.device}: {props.name}, {gib:.1f} GiB, {dtype}")
    if choice.kind == "mps":
        return RunnerCheck("device", "ok", f"mps (Apple GPU), {dtype}")
    if settings.device == "auto" and _nvidia_gpu_present():
        return RunnerCheck(
            "device",
            "fail",
            "this machine has an NVIDIA GPU (nvidia-smi lists it) but torch cannot use it, "
            "so the runner would train on the CPU",
            f"install a CUDA build of torch ({TORCH_HELP}), or set ATELIER_DEVICE=cpu to use "
            "the CPU on purpose",
        )
    return RunnerCheck(
        "device",
        "ok",
        f"cpu, {dtype} (no GPU found: fine for the built-in tiny model, slow for real weights)",
    )


# --- base models ------------------------------------------------------------------------


def source_kind(source: str) -> SourceKind:
    """Which kind of source this is; the same rules as BaseModelSpec.kind, without diffusers."""
    if source in BUILTIN_MODELS:
        return "builtin"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.suffix:
        return "single_file"
    if _HUB_ID.match(source):
        return "hub"
    raise SourceError(
        f"'{source}' is not a built-in model, an existing folder, a .safetensors file or a hub "
        "id like org/name"
    )


def configured_sources(settings: Settings) -> dict[str, dict[str, str]]:
    """Every base model by name as {source, config?, family?}: built-ins, then the config's."""
    models: dict[str, dict[str, str]] = {name: {"source": name} for name in BUILTIN_MODELS}
    for name, value in settings.base_models.items():
        models[name] = {"source": value} if isinstance(value, str) else dict(value)
    return models


def _pipeline_class(index: Path) -> str:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"'{index}' cannot be read as JSON ({exc})") from None
    class_name = str(data.get("_class_name", "")) if isinstance(data, dict) else ""
    # The families' own list (torch, not diffusers, comes with it).
    from gpu_runner.families import family_of_class_name, runs_labels

    if family_of_class_name(class_name) is None:
        raise SourceError(
            f"'{index.parent}' holds a {class_name or 'pipeline of unknown type'}; Atelier runs "
            f"{runs_labels()} text-to-image pipelines"
        )
    return class_name


def _diffusers_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise SourceError(f"'{folder}' has no model_index.json, so it is not a diffusers folder")
    return _pipeline_class(index)


def _describe_folder(folder: Path) -> str:
    return f"diffusers folder {folder} ({_diffusers_folder(folder)})"


def _describe_single_file(source: str, config: str | None) -> str:
    path = Path(source).expanduser()
    if not path.is_file():
        raise SourceError(f"file '{path}' does not exist")
    try:
        header = read_safetensors_header(path, max_file_bytes=64 * 1024**3)
    except LoraImportError as exc:
        raise SourceError(str(exc)) from None
    if not config:
        raise SourceError(
            f"'{path.name}' is a single file, which loads offline only with `config` set to a "
            "local diffusers folder of the same architecture"
        )
    config_dir = Path(config).expanduser()
    if not config_dir.is_dir():
        raise SourceError(f"its config folder '{config_dir}' does not exist")
    _diffusers_folder(config_dir)
    return f"single file {path} ({len(header.tensors)} tensors), config {config_dir}"


def _describe_hub(repo_id: str) -> str:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if not isinstance(cached, str):
        also = f" and there is no folder '{Path(repo_id).resolve()}'" if "/" in repo_id else ""
        raise SourceError(
            f"hub id '{repo_id}' is not in the Hugging Face cache at {constants.HF_HUB_CACHE}"
            f"{also}; Atelier never downloads models"
        )
    return f"hub id {repo_id}, cached ({_pipeline_class(Path(cached))})"


def describe_source(entry: Mapping[str, str]) -> str:
    """What the source is, or SourceError saying why it cannot be used."""
    source = entry.get("source") or entry.get("path")
    if not source:
        raise SourceError("has no source; give a folder, a .safetensors file or a hub id")
    family = entry.get("family")
    if family is not None and family not in FAMILY_LABELS:
        raise SourceError(f"has family '{family}'; use one of {', '.join(FAMILY_LABELS)}")
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise SourceError(f"'{source}' does not exist")
    kind = source_kind(source)
    if kind == "builtin":
        return "built in; random weights, so its images are noise (for tests and the demo)"
    if kind == "folder":
        return _describe_folder(Path(source).expanduser())
    if kind == "single_file":
        return _describe_single_file(source, entry.get("config"))
    return _describe_hub(source)


def _source_fix(entry: Mapping[str, str]) -> str:
    source = entry.get("source") or ""
    if source and source_kind_or_none(source) == "hub":
        return (
            f"fetch it once where there is internet (`hf download {source}`) into this "
            "machine's HF_HOME, or set its source to a local diffusers folder in "
            "ATELIER_BASE_MODELS"
        )
    return (
        "correct its entry in ATELIER_BASE_MODELS: a diffusers folder (with model_index.json), a "
        '.safetensors file with "config": a diffusers folder, or a cached hub id (in docker '
        "compose, paths are inside the runner's container, e.g. /models/...)"
    )


def source_kind_or_none(source: str) -> SourceKind | None:
    try:
        return source_kind(source)
    except SourceError:
        return None


def _load(name: str, entry: Mapping[str, str], device: Any) -> str:
    from gpu_runner.pipelines import BaseModelSpec, load_pipeline

    loaded = load_pipeline(BaseModelSpec.from_config(name, dict(entry)), device)
    try:
        return f"loads as {FAMILY_LABELS[loaded.family]} ({loaded.nbytes / 1024**3:.2f} GiB)"
    finally:
        del loaded
        gc.collect()


def _load_device(settings: Settings) -> Any:
    from gpu_runner.devices import DeviceError, resolve_device

    try:
        return resolve_device(settings.device)
    except DeviceError:
        return resolve_device("cpu")


def base_model_checks(settings: Settings, *, load: bool = False) -> list[RunnerCheck]:
    checks: list[RunnerCheck] = []
    device = _load_device(settings) if load else None
    for name, entry in configured_sources(settings).items():
        label = f"base model {name}"
        try:
            detail = describe_source(entry)
        except SourceError as exc:
            checks.append(RunnerCheck(label, "fail", str(exc), _source_fix(entry)))
            continue
        if load:
            try:
                detail = f"{detail}; {_load(name, entry, device)}"
            except Exception as exc:  # diffusers raises many types; the message names it
                checks.append(
                    RunnerCheck(
                        label,
                        "fail",
                        f"{detail}, but it does not load: {exc}",
                        "check the files are complete (copy them again) and of a supported "
                        "architecture (SD1.5/SD2, SDXL)",
                    )
                )
                continue
        checks.append(RunnerCheck(label, "ok", detail))
    return checks


def runner_checks(settings: Settings, *, load_models: bool = False) -> list[RunnerCheck]:
    checks = [torch_check(), package_check(), device_check(settings)]
    return checks + base_model_checks(settings, load=load_models)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_runner.doctor", description=__doc__)
    parser.add_argument("--load-models", action="store_true", help="also load each base model")
    parser.add_argument("--json", action="store_true", help="one JSON object (for atelier doctor)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        checks = [RunnerCheck("settings", "fail", str(exc), "fix the settings named above")]
    else:
        checks = runner_checks(settings, load_models=args.load_models)
    if args.json:
        print(json.dumps({"checks": [asdict(check) for check in checks]}))
    else:
        for check in checks:
            print(f"{_MARKS[check.status]} {check.name}: {check.detail}")
            if check.fix:
                print(f"    fix: {check.fix}")
    return 1 if any(check.status == "fail" for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
