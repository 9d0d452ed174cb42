"""Which runs a benchmark makes: PyTorch eager (dense, the config's policy, forced ratios), skiptool's
ONNX Runtime backend on export folders (:class:`ExportPlan`), ``--target ort`` exports in
onnxruntime-genai, the peers (onnxruntime-genai, llama.cpp), and skipped notes for absent GPU providers.
:func:`plan_runs` puts them together in table order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import SkipToolError
from .harness import MaskedView, RunSpec, shared
from .ideal import GraphBytes, IdealBasis, forced_mask, onnx_graph_bytes, onnx_precision

if TYPE_CHECKING:
    from .run import BenchRequest


def torch_specs(model: Any, adapter: Any, config: Any | None, ratios: Sequence[float],
                device: str = "cpu") -> list[RunSpec]:
    """PyTorch eager runs on one shared model: dense, the config's policy, and forced ratios.

    Forced runs use the config's policy (so a router still runs and is paid for) with warm-up 0 and an
    override that forces every layer: the chosen ones to skip, all others to compute.
    """
    from ..backends.torch_backend import TorchBackend
    from ..config import dense_config
    from ..info import decode_weight_bytes

    ffn_bytes, total_bytes = decode_weight_bytes(model, adapter)
    base = config if config is not None else dense_config(model)
    layers, skippable = base.model.num_layers, base.skippable_layers

    def basis(backend: Any) -> IdealBasis:
        return IdealBasis(dense_bytes=total_bytes, base_bytes=total_bytes + backend.policy_bytes(),
                          skippable_bytes=ffn_bytes * len(skippable) / layers, num_layers=layers,
                          num_skippable=len(skippable), substitute_bytes=backend.substitute_bytes())

    precision = TorchBackend(model, adapter).precision
    settings = {"device": device}
    specs = [RunSpec("torch", "dense", precision, lambda: TorchBackend(model, adapter, device=device),
                     settings=settings)]
    if config is not None and config.policy.kind != "none":
        specs.append(RunSpec("torch", "skip", precision, lambda: TorchBackend(model, adapter, config, device=device),
                             policy=config.policy.kind, ideal=basis, settings=settings))
    forced = base.evolve(warmup=0)
    for ratio in ratios:
        mask = forced_mask(layers, skippable, ratio)
        specs.append(RunSpec("torch", "skip", precision,
                             lambda mask=mask: TorchBackend(model, adapter, forced, override=mask, device=device),
                             policy="forced", forced_ratio=ratio, ideal=basis,
                             settings={**settings, "forced_layers": [i for i, v in enumerate(mask) if v == 1]}))
    return specs


@dataclass
class ExportPlan:
    """An export folder to benchmark: its graph, precision, weight bytes, mode and skip config (the one the
    export wrote beside its graph; else the one given to bench).

    Two kinds of folders: ``skiptool export --format onnx`` writes ``skiptool_export.json`` and runs in
    skiptool's ONNX Runtime backend (its dense counterpart is a ``--dense`` export of the same precision,
    given with another ``--onnx``); ``--target ort`` writes onnxruntime-genai's graph with ``If`` nodes and
    runs in onnxruntime-genai's generator (its dense counterpart is the model builder's own graph).
    """

    directory: Path
    precision: str
    mode: str  # "skip" or "dense"
    graph_bytes: GraphBytes
    config: Any | None
    info: dict[str, Any] | None = None

    @classmethod
    def of(cls, directory: str | Path, config: Any | None) -> "ExportPlan":
        directory = Path(directory)
        info_path = directory / "skiptool_export.json"
        info = _read_json(info_path) if info_path.is_file() else None
        graph = directory / ((info or {}).get("file") or "model.onnx")
        if not graph.is_file():
            raise SkipToolError(f"no ONNX graph in {directory} (expected a `skiptool export --format onnx` folder)")
        graph_bytes = onnx_graph_bytes(graph)
        precision = (info or {}).get("precision") or onnx_precision(graph)
        mode = (info or {}).get("mode") or ("skip" if graph_bytes.num_ifs else "dense")
        return cls(directory, precision, mode, graph_bytes, _config_beside([directory]) or config, info)

    @property
    def runner(self) -> str | None:
        """"onnxruntime" (skiptool's backend), "onnxruntime-genai" (a --target ort export), or None."""
        if self.info is not None:
            return "onnxruntime"
        from ..exporters.ort_target import OVERRIDE_MODEL_FILE

        if (self.directory / "genai_config.json").is_file() and (self.directory / OVERRIDE_MODEL_FILE).is_file():
            return "onnxruntime-genai"
        return None

    def basis(self, num_layers: int, dense_graph_bytes: GraphBytes | None) -> IdealBasis:
        dense = dense_graph_bytes.read_dense if dense_graph_bytes is not None else None
        return self.graph_bytes.basis(num_layers, dense)

    def settings(self, threads: int | None, spin: bool | None) -> dict[str, Any]:
        return {"threads": threads, "spin": spin, "graph": str(self.directory),
                "if_nodes": self.graph_bytes.num_ifs, "branch_weight_share": self.graph_bytes.branch_share}


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SkipToolError(f"cannot read {path}: {exc}") from None


def export_variant_specs(plan: ExportPlan, backend: str, num_layers: int, ratios: Sequence[float],
                         policy_make: Callable[[], Any], masked_make: Callable[[], Any], basis: IdealBasis,
                         settings: dict[str, Any]) -> list[RunSpec]:
    """A skipping export's runs for one runner: its own policy (if the config has one) and each forced ratio.

    The forced runs share one loaded backend (`masked_make`, called once) and set their mask at reset.
    """
    label = f"{backend} {plan.precision} skip {{}} (skiptool graph)"
    specs = []
    if plan.config is not None and plan.config.policy.kind != "none":
        specs.append(RunSpec(backend, "skip", plan.precision, policy_make, policy=plan.config.policy.kind,
                             ideal=basis, settings=settings, label=label.format(plan.config.policy.kind)))
    skippable = plan.config.skippable_layers if plan.config is not None else list(range(num_layers))
    loaded = shared(masked_make)
    for ratio in ratios:
        mask = forced_mask(num_layers, skippable, ratio)
        specs.append(RunSpec(backend, "skip", plan.precision, lambda mask=mask: MaskedView(loaded(), mask),
                             policy="forced", forced_ratio=ratio, ideal=basis, label=label.format(f"{ratio:.0%} forced"),
                             settings={**settings, "forced_layers": [i for i, v in enumerate(mask) if v == 1]}))
    return specs


def genai_export_specs(plan: ExportPlan, num_layers: int, ratios: Sequence[float], threads: int | None,
                       spin: bool | None, max_length: int, dense_graph: Path | None) -> list[RunSpec]:
    """Runs of a ``--target ort`` export in onnxruntime-genai's own generator (its dense peer is the baseline)."""
    from ..backends.peers import GenaiBackend
    from ..exporters.ort_target import MODEL_FILE, OVERRIDE_MODEL_FILE

    warmup = plan.config.warmup if plan.config is not None else 0

    def make(filename: str) -> Callable[[], Any]:
        return lambda: GenaiBackend(plan.directory, plan.precision, threads, spin, max_length, filename=filename,
                                    warmup=warmup)

    dense = onnx_graph_bytes(dense_graph) if dense_graph is not None else None
    return export_variant_specs(plan, "onnxruntime-genai", num_layers, ratios, make(MODEL_FILE),
                                make(OVERRIDE_MODEL_FILE), plan.basis(num_layers, dense), plan.settings(threads, spin))


def ort_export_specs(plans: Sequence[ExportPlan], num_layers: int, ratios: Sequence[float], threads: int | None,
                     spin: bool | None) -> list[RunSpec]:
    """skiptool's ONNX Runtime backend on standard exports: each dense export, then each skipping one
    (compared with the dense export of the same precision)."""
    from ..backends.onnxruntime import OrtBackend

    return _folder_specs(plans, "onnxruntime", lambda d: OrtBackend(d, threads=threads, spin=spin), num_layers,
                         ratios, lambda plan: plan.settings(threads, spin))


def tensorrt_specs(plans: Sequence[ExportPlan], num_layers: int, ratios: Sequence[float]) -> list[RunSpec]:
    """The TensorRT engines of ``--format tensorrt`` folders, as :func:`ort_export_specs` runs them; one skipped
    row saying why when TensorRT or a GPU is missing."""
    from ..backends.tensorrt_backend import TrtBackend, tensorrt_unavailable
    from ..exporters.tensorrt import ENGINE_FILE

    engines = [p for p in plans if (p.directory / ENGINE_FILE).is_file()]
    if not engines:
        return []
    reason = tensorrt_unavailable()
    if reason is not None:
        return [RunSpec("tensorrt", p.mode, p.precision, None, label=f"tensorrt {p.precision} {p.mode} ({p.directory.name})",
                        skipped=f"skipped: {reason}") for p in engines]
    return _folder_specs(engines, "tensorrt", TrtBackend.from_export, num_layers, ratios,
                         lambda plan: {"graph": str(plan.directory), "if_nodes": plan.graph_bytes.num_ifs})


def _folder_specs(plans: Sequence[ExportPlan], backend: str, open_backend: Callable[[Path], Any], num_layers: int,
                  ratios: Sequence[float], settings_of: Callable[[ExportPlan], dict[str, Any]]) -> list[RunSpec]:
    """Runs of skiptool's own export folders in one runtime: dense folders as they are, skipping folders with
    their policy and forced ratios, each against the dense folder of the same precision."""
    specs, dense = [], {p.precision: p for p in plans if p.mode == "dense"}
    for plan in plans:
        settings = settings_of(plan)
        make = shared(lambda plan=plan: open_backend(plan.directory))
        if plan.mode == "dense":
            specs.append(RunSpec(backend, "dense", plan.precision, make, settings=settings))
            continue
        base = dense.get(plan.precision)
        basis = plan.basis(num_layers, base.graph_bytes if base is not None else None)
        specs += export_variant_specs(plan, backend, num_layers, ratios, lambda make=make: MaskedView(make(), None),
                                      make, basis, settings)
    return sorted(specs, key=lambda s: (s.precision, s.mode != "dense"))


def peer_specs(hf_dir: str | None, gguf: str | None, threads: int | None, spin: bool | None, max_length: int,
               genai_precisions: Sequence[str] = ("fp32", "int4"), llama_cpp: bool = True) -> list[RunSpec]:
    """onnxruntime-genai and llama.cpp runs, or skipped entries saying how to install them."""
    from ..backends.peers import genai_entries, llama_cpp_entries

    entries = genai_entries(hf_dir, threads, spin, genai_precisions, max_length) if genai_precisions else []
    entries += llama_cpp_entries(gguf, threads, max_length) if llama_cpp else []
    return [RunSpec(e.backend, "dense", e.precision, e.make, policy="dense", skipped=e.skipped, optional=True,
                    settings=e.settings or {}, label=f"{e.backend} {e.precision} dense (peer)") for e in entries]


def plan_runs(req: "BenchRequest", lm: Any, config: Any | None, threads: int, max_length: int) -> list[RunSpec]:
    """Every run of a benchmark, in table order: PyTorch, ONNX Runtime, onnxruntime-genai, llama.cpp."""
    from ..backends.peers import genai_model_dir, installed

    layers = int(lm.model.config.num_hidden_layers)
    hf_dir, gguf = model_files(req.model, lm.model)
    plans = [ExportPlan.of(d, config) for d in req.onnx]
    for plan in plans:
        if plan.config is not None:
            plan.config.check_matches(lm.model)
        if plan.runner is None:
            raise SkipToolError(f"{plan.directory} is neither a `skiptool export --format onnx` folder nor a "
                                "--target ort one")
    genai = installed("onnxruntime_genai") and hf_dir is not None
    genai_plans = [p for p in plans if p.runner == "onnxruntime-genai"]
    if genai_plans and not genai:
        raise SkipToolError(f"{genai_plans[0].directory} is a --target ort export: running it needs "
                            "onnxruntime-genai (pip install onnxruntime-genai) and the model's Hugging Face folder")
    precisions = list(dict.fromkeys((["fp32", "int4"] if req.peers else []) + [p.precision for p in genai_plans]))
    genai_dense = {p: genai_model_dir(hf_dir, p) for p in precisions} if genai else {}
    specs = torch_specs(lm.model, lm.adapter, config, req.skip_ratios, req.device) if req.torch else []
    specs += ort_export_specs([p for p in plans if p.runner == "onnxruntime"], layers, req.skip_ratios, threads,
                              req.spin)
    specs += tensorrt_specs([p for p in plans if p.runner == "onnxruntime"], layers, req.skip_ratios)
    peers = peer_specs(hf_dir, gguf, threads, req.spin, max_length, precisions, llama_cpp=req.peers)
    for plan in genai_plans:
        dense = genai_dense[plan.precision] / "model.onnx"
        peers += genai_export_specs(plan, layers, req.skip_ratios, threads, req.spin, max_length, dense)
    order = {"onnxruntime-genai": 0, "llama.cpp": 1}
    notes = gpu_notes() if plans else []
    return specs + sorted(peers, key=lambda s: (order.get(s.backend, 2), s.precision, s.mode != "dense")) + notes


def gpu_notes() -> list[RunSpec]:
    """Skipped entries for ONNX Runtime's CUDA and TensorRT execution providers when they are not here."""
    providers = _ort_providers()
    wanted = {"CUDAExecutionProvider": ("onnxruntime CUDA", "pip install onnxruntime-gpu (needs an NVIDIA GPU)"),
              "TensorrtExecutionProvider": ("onnxruntime TensorRT", "pip install onnxruntime-gpu tensorrt "
                                                                    "(needs an NVIDIA GPU)")}
    return [RunSpec(name.split()[0], "dense", name.split()[1], None, label=name,
                    skipped=f"skipped: {provider} not available — install with `{command}`")
            for provider, (name, command) in wanted.items() if provider not in providers]


def model_files(source: str, model: Any) -> tuple[str | None, str | None]:
    """(Hugging Face directory, GGUF file) holding the model's weights, where they exist locally."""
    from ..models import resolve_source

    kind, path = resolve_source(source)
    hf_dir = getattr(model.config, "_name_or_path", None)
    hf_dir = hf_dir if hf_dir and Path(hf_dir).is_dir() else None
    return hf_dir, (str(path) if kind == "gguf" and path is not None else None)


def _config_beside(onnx_dirs: Sequence[Path]) -> Any | None:
    """The skip config an export wrote next to its graph (the first one found)."""
    from ..config import CONFIG_FILENAME, load_config

    for directory in onnx_dirs:
        if (Path(directory) / CONFIG_FILENAME).is_file():
            return load_config(Path(directory) / CONFIG_FILENAME)
    return None


def _ort_providers() -> list[str]:
    """ONNX Runtime's execution providers here (CUDA / TensorRT appear only with onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())
