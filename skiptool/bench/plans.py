"""Which runs a benchmark makes: PyTorch eager (dense, the config's policy, forced ratios), on CUDA the GPU decode
path (the same runs graphed, with the decisions on the device and, for comparison, on the host), every export folder
in every runtime its manifest names (:class:`ExportPlan`; a runtime that cannot run here is one skipped row),
the registered peers, and skipped notes for absent GPU execution providers. :func:`plan_runs` puts them
together in table order.

No runtime, target or peer is named here: folders are opened through the runtime registry
(:data:`skiptool.backends.RUNTIMES`) and peers come from :data:`skiptool.backends.peers.PEERS`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..contract import ExportManifest, read_manifest
from ..errors import SkipToolError
from ..ideal import GraphBytes, IdealBasis, forced_mask, onnx_graph_bytes
from .harness import MaskedView, RunSpec, shared
from .request import BenchRequest


def torch_specs(model: Any, adapter: Any, config: Any | None, ratios: Sequence[float],
                device: str = "cpu") -> list[RunSpec]:
    """PyTorch eager runs on one shared model: dense, the config's policy, and forced ratios."""
    from ..backends.torch_backend import TorchBackend
    from ..config import dense_config
    from ..info import decode_weight_bytes
    from ..models import precision_of

    ffn_bytes, total_bytes = decode_weight_bytes(model, adapter)
    base = config if config is not None else dense_config(model)
    layers, skippable = base.model.num_layers, base.skippable_layers

    def basis(backend: Any) -> IdealBasis:
        return IdealBasis(dense_bytes=total_bytes, base_bytes=total_bytes + backend.policy_bytes(),
                          skippable_bytes=ffn_bytes * len(skippable) / layers, num_layers=layers,
                          num_skippable=len(skippable), substitute_bytes=backend.substitute_bytes())

    def make(run_config: Any, override: list[int] | None) -> Callable[[], Any]:
        return lambda: TorchBackend(model, adapter, run_config, override=override, device=device)

    precision = precision_of(model)
    settings = {"device": device}
    dense = RunSpec("torch", "dense", precision, make(None, None), settings=settings)
    return [dense] + skip_specs("torch", precision, make, config, base, ratios, basis, settings)


def cuda_specs(model: Any, adapter: Any, config: Any | None, ratios: Sequence[float],
               max_length: int) -> list[RunSpec]:
    """The GPU decode path's runs (:class:`~skiptool.gpu.EngineBackend`: a static KV cache, the decode step replayed
    as a CUDA graph): dense, then the config's policy and the forced ratios twice — with the decisions read on the
    device, and read on the host per layer (what ONNX Runtime's and TensorRT's ``If`` do)."""
    from ..config import dense_config
    from ..gpu.backend import EngineBackend
    from ..models import precision_of

    base = config if config is not None else dense_config(model)
    precision = precision_of(model)
    device = str(next(model.parameters()).device)

    def maker(ffn_mode: str) -> Callable[[Any, list[int] | None], Callable[[], Any]]:
        def make(run_config: Any, override: list[int] | None) -> Callable[[], Any]:
            return lambda: EngineBackend(model, adapter, run_config, ffn_mode=ffn_mode, override=override,
                                         max_len=max_length)
        return make

    def settings(ffn_mode: str) -> dict[str, Any]:
        return {"device": device, "ffn_mode": ffn_mode, "max_len": max_length}

    specs = [RunSpec(EngineBackend.name, "dense", precision, maker("dense")(None, None), settings=settings("dense"))]
    for ffn_mode, variant in (("device", ""), ("host", "host sync")):
        specs += skip_specs(EngineBackend.name, precision, maker(ffn_mode), config, base, ratios,
                            EngineBackend.ideal_basis, settings(ffn_mode), variant)
    return specs


def skip_specs(backend: str, precision: str, make: Callable[[Any, list[int] | None], Callable[[], Any]],
               config: Any | None, base: Any, ratios: Sequence[float], ideal: Callable[[Any], IdealBasis],
               settings: dict[str, Any], variant: str = "") -> list[RunSpec]:
    """A backend's skipping runs, built by ``make(config, override)``: the config's own policy (when it has one),
    and each forced ratio (:func:`forced_run` of the `base` config). A `variant` (e.g. "host sync") is added to
    each label."""
    specs = []
    if config is not None and config.policy.kind != "none":
        specs.append(RunSpec(backend, "skip", precision, make(config, None), policy=config.policy.kind, ideal=ideal,
                             settings=settings))
    for ratio in ratios:
        forced, mask = forced_run(base, ratio)
        forced_layers = [i for i, v in enumerate(mask) if v == 1]
        specs.append(RunSpec(backend, "skip", precision, make(forced, mask), policy="forced", forced_ratio=ratio,
                             ideal=ideal, settings={**settings, "forced_layers": forced_layers}))
    for spec in specs:
        spec.label += f" ({variant})" if variant else ""
    return specs


def forced_run(base: Any, ratio: float) -> tuple[Any, list[int]]:
    """The config and override of a run forced to skip `ratio` of all FFNs: `base`'s policy (so a router still runs
    and is paid for) with warm-up 0, and an override that forces every layer — the chosen ones to skip, all others
    to compute."""
    return base.evolve(warmup=0), forced_mask(base.model.num_layers, base.skippable_layers, ratio)


@dataclass
class ExportPlan:
    """An export folder to benchmark: its manifest, graph weight bytes and skip config (the one the export wrote
    beside its graph; else the one given to bench)."""

    directory: Path
    manifest: ExportManifest
    graph_bytes: GraphBytes
    config: Any | None

    @classmethod
    def of(cls, directory: str | Path, config: Any | None) -> "ExportPlan":
        directory = Path(directory)
        manifest = read_manifest(directory)
        graph = directory / manifest.file
        if not graph.is_file():
            raise SkipToolError(f"{directory}: the manifest names {manifest.file}, which is missing")
        return cls(directory, manifest, onnx_graph_bytes(graph), config_beside(directory) or config)

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def mode(self) -> str:
        return self.manifest.mode

    def basis(self, dense_graph_bytes: GraphBytes | None) -> IdealBasis:
        dense = dense_graph_bytes.read_dense if dense_graph_bytes is not None else None
        return self.graph_bytes.basis(self.manifest.num_layers, dense)

    def settings(self, threads: int | None, spin: bool | None) -> dict[str, Any]:
        return {"threads": threads, "spin": spin, "graph": str(self.directory), "target": self.manifest.target,
                "if_nodes": self.graph_bytes.num_ifs, "branch_weight_share": self.graph_bytes.branch_share}


def config_beside(folder: Path) -> Any | None:
    """The skip config an export wrote next to its graph (None when there is none)."""
    from ..config import CONFIG_FILENAME, load_config

    return load_config(folder / CONFIG_FILENAME) if (folder / CONFIG_FILENAME).is_file() else None


def export_variant_specs(plan: ExportPlan, backend: str, ratios: Sequence[float], policy_make: Callable[[], Any],
                         masked_make: Callable[[], Any], basis: IdealBasis, settings: dict[str, Any]) -> list[RunSpec]:
    """A skipping export's runs in one runtime: its own policy (if the config has one) and each forced ratio.

    The forced runs share one loaded backend (`masked_make`, called once) and set their mask at reset.
    """
    label = f"{backend} {plan.precision} skip {{}} (skiptool graph)"
    specs = []
    if plan.config is not None and plan.config.policy.kind != "none":
        specs.append(RunSpec(backend, "skip", plan.precision, policy_make, policy=plan.config.policy.kind,
                             ideal=basis, settings=settings, label=label.format(plan.config.policy.kind)))
    layers = plan.manifest.num_layers
    skippable = list(plan.manifest.skippable_layers)
    loaded = shared(masked_make)
    for ratio in ratios:
        mask = forced_mask(layers, skippable, ratio)
        specs.append(RunSpec(backend, "skip", plan.precision, lambda mask=mask: MaskedView(loaded(), mask),
                             policy="forced", forced_ratio=ratio, ideal=basis, label=label.format(f"{ratio:.0%} forced"),
                             settings={**settings, "forced_layers": [i for i, v in enumerate(mask) if v == 1]}))
    return specs


def folder_specs(plans: Sequence[ExportPlan], ratios: Sequence[float], threads: int | None, spin: bool | None,
                 max_length: int, dense_bytes: dict[tuple[str, str], GraphBytes]) -> list[RunSpec]:
    """Every export folder in every runtime its manifest names: dense folders as they are, skipping folders with
    their policy and forced ratios, each against the dense run of the same runtime and precision
    (`dense_bytes` holds the weight bytes of dense graphs that are not folders here, e.g. a peer's)."""
    from ..backends import RUNTIMES

    dense = {**dense_bytes, **{(r, p.precision): p.graph_bytes for p in plans if p.mode == "dense"
                               for r in p.manifest.runtimes}}
    specs: list[RunSpec] = []
    for plan in plans:
        settings = plan.settings(threads, spin)
        for name in plan.manifest.runtimes:
            runtime = RUNTIMES.get(name)
            reason = runtime.unavailable()
            if reason is not None:
                specs.append(RunSpec(name, plan.mode, plan.precision, None, skipped=f"skipped: {reason}",
                                     label=f"{name} {plan.precision} {plan.mode} ({plan.directory.name})"))
                continue
            specs += _runtime_specs(plan, name, runtime, ratios, threads, spin, max_length, settings,
                                    dense.get((name, plan.precision)))
    return distinct_labels(specs)


def distinct_labels(specs: list[RunSpec]) -> list[RunSpec]:
    """Export folders of the same runtime and precision give their runs the same labels: those labels get the
    folder's name, so the table and the JSON tell the runs apart."""
    counts = Counter(spec.label for spec in specs)
    for spec in specs:
        if counts[spec.label] > 1 and "graph" in spec.settings:
            spec.label += f" [{Path(spec.settings['graph']).name}]"
    return specs


def _runtime_specs(plan: ExportPlan, name: str, runtime: Any, ratios: Sequence[float], threads: int | None,
                   spin: bool | None, max_length: int, settings: dict[str, Any],
                   dense: GraphBytes | None) -> list[RunSpec]:
    from ..backends import RunOptions

    def opener(mask: list[int] | None) -> Callable[[], Any]:
        options = RunOptions(threads=threads, spin=spin, skip_mask=mask, max_length=max_length)
        return lambda: runtime.open(plan.directory, plan.manifest, options)

    if plan.mode == "dense":
        return [RunSpec(name, "dense", plan.precision, shared(opener(None)), settings=settings)]
    no_override = [0] * plan.manifest.num_layers  # opens a graph whose skip_mask can be set at every reset
    return export_variant_specs(plan, name, ratios, opener(None), opener(no_override), plan.basis(dense), settings)


def peer_specs(ctx: Any, names: Sequence[str] | None = None) -> list[RunSpec]:
    """The registered peers' runs (all, or those in `names`), or skipped entries saying how to install them."""
    from ..backends.peers import PEERS

    entries = [e for name in (names if names is not None else PEERS.names()) for e in PEERS.get(name)(ctx)]
    return [RunSpec(e.backend, "dense", e.precision, e.make, policy="dense", skipped=e.skipped, optional=True,
                    settings=e.settings, label=f"{e.backend} {e.precision} dense (peer)") for e in entries]


def plan_runs(req: BenchRequest, lm: Any, config: Any | None, threads: int, max_length: int) -> list[RunSpec]:
    """Every run of a benchmark, in table order: PyTorch (eager, then the GPU decode path on CUDA), export folders
    by runtime, peers, GPU notes."""
    from ..backends.peers import PeerContext

    plans = [ExportPlan.of(d, config) for d in req.onnx]
    for plan in plans:
        if plan.config is not None:
            plan.config.check_matches(lm.model)
    hf_dir, gguf = model_files(req.model, lm.model)
    # peers run when asked, and genai's dense graph always when an export runs in genai (it is the baseline)
    genai_precisions = [p.precision for p in plans if "onnxruntime-genai" in p.manifest.runtimes]
    precisions = tuple(dict.fromkeys((["fp32", "int4"] if req.peers else []) + genai_precisions))
    ctx = PeerContext(hf_dir, gguf, threads, req.spin, max_length, precisions)
    peers = peer_specs(ctx, None if req.peers else (["onnxruntime-genai"] if genai_precisions else []))
    torch_runs = torch_specs(lm.model, lm.adapter, config, req.skip_ratios, req.device) if req.torch else []
    if req.device.startswith("cuda"):
        torch_runs += cuda_specs(lm.model, lm.adapter, config, req.skip_ratios, max_length)
    folders = folder_specs(plans, req.skip_ratios, threads, req.spin, max_length,
                           _genai_dense_bytes(hf_dir, genai_precisions))
    order = {name: i for i, name in enumerate(["onnxruntime", "tensorrt", "onnxruntime-genai", "llama.cpp"])}
    rest = sorted(folders + peers, key=lambda s: (order.get(s.backend, len(order)), s.precision, s.mode != "dense"))
    return torch_runs + rest + (gpu_notes() if plans else [])


def _genai_dense_bytes(hf_dir: str | None, precisions: Sequence[str]) -> dict[tuple[str, str], GraphBytes]:
    """Weight bytes of onnxruntime-genai's dense graphs: the baseline of ``ort`` exports run in genai."""
    from ..contract import MODEL_FILE
    from ..genai_builder import genai_model_dir

    if hf_dir is None or not precisions:
        return {}
    return {("onnxruntime-genai", p): onnx_graph_bytes(genai_model_dir(hf_dir, p) / MODEL_FILE) for p in precisions}


def gpu_notes() -> list[RunSpec]:
    """Skipped entries for ONNX Runtime's CUDA and TensorRT execution providers when they are not here."""
    from ..ort import available_providers

    providers = available_providers()
    install = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
    wanted = {"CUDAExecutionProvider": ("onnxruntime CUDA", f"{install}  (needs an NVIDIA GPU)"),
              "TensorrtExecutionProvider": ("onnxruntime TensorRT", f"{install} tensorrt  (needs an NVIDIA GPU)")}
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
