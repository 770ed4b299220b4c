"""One ONNX Runtime session over an exported draft graph (see export.py for its inputs and outputs).

Two ways to run it, same graph, same results:

- plain (session.run): numpy in, numpy out. On the CUDA provider every run copies the whole past KV to the
  device and the whole present KV back, so a tree of d layers moves the batch's KV across PCIe 2(d+1) times.
- I/O binding (default on CUDA; `io_binding=True` on CPU, for tests): ids, positions and mask are bound from host
  arrays (small), top-K probs and ids are bound to host memory (the only outputs that cross), the present KV is
  bound to device memory and comes back as OrtValue handles. A run takes its past KV as numpy (copied to the
  device once) or as OrtValues, so the previous run's present is passed through without leaving the device.

CUDA graphs (the CUDA provider's `enable_cuda_graph`) are not used: a captured graph replays fixed shapes at
fixed device addresses, and here the KV grows every run (P -> P+T) and T changes per layer and per batch. They
would need a static-shape export (a KV buffer of max_context columns written in place, the mask covering all of
it, one captured graph per (B, T) bucket via the `gpu_graph_id` run option); see draft_service/README.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from draft_service.export import ExportMeta, io_names

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# OrtValue / bind_output device names per provider.
DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}

KV = np.ndarray | ort.OrtValue  # one layer's keys or values, [B, Hkv, P, D]


def choose_provider(provider: str = "auto") -> str:
    """auto: CUDA when this onnxruntime build has it, else CPU; cpu / cuda: that one or an error."""
    available = ort.get_available_providers()
    if provider == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be auto, cpu or cuda, got {provider!r}")
    if PROVIDERS[provider] not in available:
        raise ValueError(f"{PROVIDERS[provider]} is not in this onnxruntime build (available: {available})")
    return PROVIDERS[provider]


def choose_dtype(dtype: str, provider: str) -> str:
    """auto: float16 on the CUDA provider (half the KV bytes, tensor cores), float32 on CPU (ORT's CPU kernels
    are fp32 first); float32 / float16: as given. provider: an ORT provider name, as choose_provider returns."""
    if dtype != "auto":
        return dtype
    return "float16" if provider == PROVIDERS["cuda"] else "float32"


@dataclass
class Traffic:
    """Bytes between host and device memory, counted as the CUDA provider moves them. On the CPU provider the same
    copies are host to host or none: the count says what would cross on a GPU, so tests can check it."""

    kv_to_device: int = 0  # past KV given as numpy
    kv_to_host: int = 0    # present KV returned as numpy (plain), or columns copied out (columns_to_host)
    io_to_device: int = 0  # input_ids, position_ids, attention_mask
    io_to_host: int = 0    # topk_probs, topk_ids

    @property
    def kv(self) -> int:
        return self.kv_to_device + self.kv_to_host

    def since(self, before: Traffic) -> Traffic:
        return Traffic(*(a - b for a, b in zip(asdict(self).values(), asdict(before).values())))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class StepOutput:
    probs: np.ndarray   # [B, T, K] float32, descending (host)
    ids: np.ndarray     # [B, T, K] int64 (host)
    keys: list[KV]      # per layer [B, Hkv, P+T, D]: numpy (plain) or OrtValues on the device (I/O binding)
    values: list[KV]


class DraftRunner:
    """The draft model as a function: (tokens, positions, mask, past KV) -> (top-K, present KV)."""

    def __init__(self, onnx_path: str | Path, meta: ExportMeta, provider: str = "auto", threads: int = 0,
                 io_binding: bool | None = None, spinning: bool = False) -> None:
        self.meta = meta
        self.provider = choose_provider(provider)
        self.device = DEVICES[self.provider]
        self.device_id = 0  # the provider's default device; CUDA_VISIBLE_DEVICES picks the card
        # None: on for CUDA, where it saves the KV copies; off for CPU, where there are none to save.
        self.io_binding = self.provider == PROVIDERS["cuda"] if io_binding is None else io_binding
        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        # ORT's worker threads spin after each run by default. A draft's runs are short and the verifier works right
        # after them: on a CPU shared with the verifier (2 cores here) the spinning made each Verify 2-3x slower.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if self.provider == PROVIDERS["cuda"] and hasattr(ort, "preload_dlls"):
            # The CUDA provider needs cuBLAS / cuDNN loaded; without torch imported first (the service does not
            # import it once the graph is cached), ORT finds them in the nvidia-* wheels only when asked to.
            ort.preload_dlls()
        self.session = ort.InferenceSession(str(onnx_path), sess_options=self.options, providers=[self.provider])
        self.input_names, self.output_names = io_names(meta.num_layers)
        self.dtype = np.dtype(meta.dtype)
        # The additive mask's "hidden" value: finite, so a row is never all -inf (softmax of that is NaN).
        self.mask_min = float(np.finfo(self.dtype).min)
        self.traffic = Traffic()
        self._slicers: dict[int, ort.InferenceSession] = {}  # by tensor count, made on first use

    @property
    def backend(self) -> str:
        return f"onnxruntime:{self.provider}" + ("+iobinding" if self.io_binding else "")

    def empty_kv(self, length: int = 0) -> np.ndarray:
        return np.zeros((self.meta.num_kv_heads, length, self.meta.head_dim), dtype=self.dtype)  # [Hkv, P, D]

    def run(
        self,
        input_ids: np.ndarray,        # [B, T] int64
        position_ids: np.ndarray,     # [B, T] int64
        attention_mask: np.ndarray,   # [B, 1, T, P+T] additive, model dtype
        past_keys: list[KV],          # per layer [B, Hkv, P, D]
        past_values: list[KV],
    ) -> StepOutput:
        small = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=self.dtype),
        }
        self.traffic.io_to_device += sum(a.nbytes for a in small.values())
        past = [kv for pair in zip(past_keys, past_values) for kv in pair]  # key0, value0, key1, ...
        if self.io_binding:
            return self._run_bound(small, past)
        feeds = dict(small)
        for name, kv in zip(self.input_names[3:], past):
            feeds[name] = self._host(kv)
            self.traffic.kv_to_device += feeds[name].nbytes
        out = self.session.run(self.output_names, feeds)
        self.traffic.io_to_host += out[0].nbytes + out[1].nbytes
        self.traffic.kv_to_host += sum(a.nbytes for a in out[2:])
        return StepOutput(probs=out[0], ids=out[1], keys=out[2::2], values=out[3::2])

    def _run_bound(self, small: dict[str, np.ndarray], past: list[KV]) -> StepOutput:
        # A fresh binding per run: get_outputs() may hand out references into the binding's output vector, which a
        # second run on the same binding would overwrite while the caller still holds them as the next past.
        binding = self.session.io_binding()
        for name, array in small.items():
            binding.bind_cpu_input(name, array)
        for name, kv in zip(self.input_names[3:], past):
            binding.bind_ortvalue_input(name, kv if isinstance(kv, ort.OrtValue) else self._device_value(kv))
        binding.bind_output("topk_probs", "cpu")
        binding.bind_output("topk_ids", "cpu")
        for name in self.output_names[2:]:
            binding.bind_output(name, self.device, self.device_id)  # ORT allocates: the shape is P+T
        self.session.run_with_iobinding(binding)  # synchronous: the host outputs are complete on return
        out = binding.get_outputs()
        probs, ids = out[0].numpy(), out[1].numpy()
        self.traffic.io_to_host += probs.nbytes + ids.nbytes
        return StepOutput(probs=probs, ids=ids, keys=out[2::2], values=out[3::2])

    def to_device(self, arrays: list[np.ndarray]) -> list[KV]:
        """Per layer [B, Hkv, P, D] numpy -> OrtValues on the device (I/O binding), or the arrays (plain)."""
        return [self._device_value(a) for a in arrays] if self.io_binding else arrays

    def columns_to_host(self, kv: list[KV], start: int, end: int) -> list[np.ndarray]:
        """Per layer [B, Hkv, S, D] -> its columns start:end on the host, [B, Hkv, end-start, D] each.

        numpy: views, nothing moves. OrtValues: a Slice graph on the same provider, its outputs bound to host
        memory, so only those columns cross (not the S columns of the whole cache).
        """
        if not kv or not isinstance(kv[0], ort.OrtValue):
            return [a[:, :, start:end] for a in kv]
        slicer = self._slicers.get(len(kv))
        if slicer is None:
            slicer = self._slicers[len(kv)] = ort.InferenceSession(
                slice_graph(len(kv), self.meta.dtype), sess_options=self.options, providers=[self.provider])
        binding = slicer.io_binding()
        for i, value in enumerate(kv):
            binding.bind_ortvalue_input(f"kv.{i}", value)
            binding.bind_output(f"columns.{i}", "cpu")
        binding.bind_cpu_input("start", np.array([start], dtype=np.int64))
        binding.bind_cpu_input("end", np.array([end], dtype=np.int64))
        slicer.run_with_iobinding(binding)
        out = [v.numpy() for v in binding.get_outputs()]
        self.traffic.kv_to_host += sum(a.nbytes for a in out)
        return out

    def _device_value(self, array: np.ndarray) -> ort.OrtValue:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        self.traffic.kv_to_device += array.nbytes  # a copy on CUDA; on CPU the OrtValue wraps the array
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

    def _host(self, kv: KV) -> np.ndarray:
        """A past given as an OrtValue to the plain path (io_binding switched off mid-call): copy it out."""
        if isinstance(kv, ort.OrtValue):
            return kv.numpy()
        return kv


def slice_graph(n: int, dtype: str) -> bytes:
    """An ONNX model: n tensors kv.{i} [B, H, S, D] and start, end [1] int64 -> columns.{i} = kv.{i}[:, :, start:end].

    Built here (onnx.helper, no torch) rather than exported: it is one Slice per tensor.
    """
    from onnx import TensorProto, helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes_value", TensorProto.INT64,
                                                                               [1], [2]))
    slices = [helper.make_node("Slice", [f"kv.{i}", "start", "end", "axes"], [f"columns.{i}"]) for i in range(n)]
    inputs = [helper.make_tensor_value_info(f"kv.{i}", elem, ["B", "H", "S", "D"]) for i in range(n)]
    inputs += [helper.make_tensor_value_info(name, TensorProto.INT64, [1]) for name in ("start", "end")]
    outputs = [helper.make_tensor_value_info(f"columns.{i}", elem, ["B", "H", "T", "D"]) for i in range(n)]
    graph = helper.make_graph([axes, *slices], "kv_columns", inputs, outputs)
    # Pinned IR and opset: the onnx package may be newer than the onnxruntime that loads this.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()
