"""The runner: the one caller of the model while generating, over one KV cache with a position per row.

    runner = Runner(model, rows=16, max_len=1024, compile=None)
    logits = runner.forward(ids, positions)                   # rows 0..B-1, positions (B, T) per row
    logits = runner.forward(ids, positions, rows=rows, last=last)   # any cache rows (chunked prefill)
    runner.move_row(src, dst, length); runner.swap_rows(a, b, length)  # continuous batching
    runner.start_padded(key_mask, pad_counts)                 # per-call batches: left-padded rows
    logits, hidden = runner.forward_padded(ids, slot, hidden=...)   # prefill (slot 0), then one token
    runner.copy_rows(index)                                   # beam / contrastive reorders
    runner.close()

The per-call engine (engine.py) and the continuous-batching engine (batcher.py) differ in scheduling, never
in how a step is computed: both call this. The model's forward pass (model.py) is the one definition of the
architecture; the backends only change how a one-token decode step runs, and are chosen in one place,
`select_backend`:

    native    the C++ one-token step (gptgen.native.decoder) of a float32 or int8-dynamic model on CPU,
              wherever it runs, whatever `compile` says (it compiles nothing; fastest; tested equal to
              model.py within float rounding). GPTGEN_NATIVE=0 turns it off.
    compiled  otherwise with compile=True: on CPU inductor (C++ kernels, weights frozen into the graph); on
              CUDA CUDA graphs (torch.compile mode="reduce-overhead"), there also with compile=None
    eager     otherwise: the model's PyTorch forward

Prefill (several tokens per row) always runs the model's forward eagerly.
"""

from __future__ import annotations

import copy
import itertools
import shutil

import torch

from .. import native
from ..errors import GenerationError
from ..native import weights_key


# Choosing a backend: the one place ------------------------------------------------------------------
def check_compile(compile) -> None:
    if compile is not None and not isinstance(compile, bool):
        raise GenerationError(f"compile must be True, False or None, got {compile!r}.")


def select_backend(model, compile: bool | None = None) -> tuple[str, object]:
    """(backend name, native decoder or None): 'native', 'compiled' or 'eager' (see the module docstring)."""
    check_compile(compile)
    device = model.embed.wte.weight.device.type
    if device == "cpu":
        step = native.decoder(model)
        if step is not None:
            return "native", step
        if compile:
            require_cxx_compiler()
            return "compiled", None
        return "eager", None
    return ("compiled" if device == "cuda" and compile is not False else "eager"), None


def require_cxx_compiler() -> None:
    """Inductor's CPU backend builds C++: one clear error where no compiler is on PATH."""
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise GenerationError("Compiling the CPU decode step needs a C++ compiler (g++ or clang++), and none "
                              "is on PATH.")


# The runner ---------------------------------------------------------------------------------------------
class Runner:
    """The model over a KV cache of `rows` rows and `max_len` positions.

    private=True runs a copy of the model's modules that shares its parameters (no weight memory), so
    another runner may use the model's own cache from another thread meanwhile (the batch engine's)."""

    def __init__(self, model, rows: int, max_len: int, *, compile: bool | None = None,
                 private: bool = False) -> None:
        self.private, self.compile = private, compile
        self.model = m = _clone_sharing_weights(model).eval() if private else model
        # the clone gets a native step of its own: its cache is not the per-call engine's
        self.backend, self.native = select_backend(m, compile)
        param = m.embed.wte.weight
        self.device, self.dtype = param.device, param.dtype
        self.rows = rows
        self.on_cpu = self.device.type == "cpu"
        self.graphs = self.backend == "compiled" and not self.on_cpu  # CUDA graphs, else inductor's step
        self.head_t = None
        self._cpu_step = None
        self.key_mask = self.pad_counts = None
        # Compiled per-call steps: a cache kept between calls (the captured graph is replayed), of a power of
        # two length (at least 256, at most the context) so short generations do not read a full-context one.
        self.keep = self.backend == "compiled" and not private
        if self.keep:
            max_len = min(m.config.n_positions, max(256, 1 << (max_len - 1).bit_length()))
            caches = m.kv_caches()
            if not (caches and m.max_cache_len == max_len and caches[0].k_cache.shape[0] == rows
                    and caches[0].k_cache.dtype == self.dtype):
                m.setup_kv_cache(rows, max_len)
        else:
            m.setup_kv_cache(rows, max_len)
        self.max_len = max_len
        self.caches = m.kv_caches()
        if self.native is not None:
            self.native.set_cache([t for c in self.caches for t in (c.k_cache, c.v_cache)])

    @property
    def grad_mode(self):
        """no_grad for compiled steps (CUDA graphs captured under inference mode would be tied to it)."""
        return torch.no_grad() if self.backend == "compiled" else torch.inference_mode()

    def _prefill_head(self) -> None:
        # The CPU head is looked up when a prompt is prefilled (a check of the weights), not at every step.
        if self.on_cpu:
            self.head_t = self.model.transposed_head()
            self._cpu_step = None

    # Rows at their own positions (continuous batching) ----------------------------------------------
    def forward(self, idx: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits (B, vocab) of one token per row: the last column, or column `last[r]` of row r.

        idx, positions: (B, T). rows: the cache rows of the B rows (None: rows 0..B-1). Positions past a
        row's real tokens may hold padding: they write slots nobody reads before they are rewritten."""
        T = idx.shape[1]
        if T > 1 or last is not None or rows is not None:
            self._prefill_head()
        elif self.graphs:
            return self._graphed_rows(idx, positions)
        elif self.backend == "native":
            return self.native.step_rows(idx.reshape(-1), positions.reshape(-1))[0]
        elif self.backend == "compiled":
            kv_len = int(positions.max()) + 1
            mask = torch.arange(kv_len, device=self.device)[None, :] <= positions
            return self._cpu_compiled(idx, positions, positions, mask)[0]
        elif self.head_t is None:
            self._prefill_head()
        x = self.model.hidden_states(idx, input_pos=positions, kv_len=int(positions.max()) + 1, rows=rows)
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.model.lm_logits(x, self.head_t).float()

    def _graphed_rows(self, idx, positions):
        """Rows 0..B-1 padded to a power-of-two bucket, over the full cache length so every shape is fixed;
        padding rows write the last slot, which no sequence reads (prompt + new tokens never fill it)."""
        B = idx.shape[0]
        pad = min(self.rows, 1 << (B - 1).bit_length()) - B
        if pad:
            idx = torch.cat([idx, idx.new_zeros(pad, 1)])
            positions = torch.cat([positions, positions.new_full((pad, 1), self.max_len - 1)])
        logits = _graphed_step(self.model, dynamic=False)(self.model, idx, positions, None, None)[0]
        return logits[:B, -1].float().clone()  # a replay overwrites the graph's outputs

    def warm_up(self, batch: int) -> None:
        """Compile the CPU step for `batch` rows now (the rows write position 2 of rows 0..batch-1)."""
        idx = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.forward(idx, torch.full_like(idx, 2))

    def move_row(self, src: int, dst: int, length: int) -> None:
        if src != dst and length > 0:
            for c in self.caches:
                c.move_row(src, dst, length)

    def swap_rows(self, a: int, b: int, length: int) -> None:
        if a != b and length > 0:
            for c in self.caches:
                c.swap_rows(a, b, length)

    # Left-padded rows (the per-call engine) --------------------------------------------------------------
    def start_padded(self, key_mask: torch.Tensor, pad_counts: torch.Tensor) -> None:
        """key_mask (rows, length): 1 where a slot holds a real token; pad_counts (rows,): each row's left
        padding (its tokens' positions are slot - pad)."""
        mask = torch.ones(self.rows, self.max_len, dtype=torch.long, device=self.device)
        mask[:, :key_mask.shape[1]] = key_mask
        self.key_mask, self.pad_counts = mask, pad_counts

    def forward_padded(self, idx: torch.Tensor, slot: int, *, hidden=None, last_only: bool = True,
                       prefill: bool = False):
        """(float logits (B, vocab) of the last token, hidden states) of tokens written at slots slot..slot+T-1
        of every row. hidden: falsy for none, else the last token's, or every token's with last_only=False.
        A prefill runs the model's forward (never a one-token backend, even for one token)."""
        T = idx.shape[1]
        if not prefill and self.backend == "native":
            logits, h = self.native.step(idx[:, 0], self.pad_counts, self.key_mask, slot)
            return logits, (h if hidden else None)
        if prefill:
            self._prefill_head()
            input_pos = torch.arange(slot, slot + T, device=self.device)
            position_ids = (input_pos[None, :] - self.pad_counts[:, None]).clamp(min=0)
        else:
            input_pos = torch.full((1,), slot, dtype=torch.long, device=self.device)  # a fill, not a host copy
            position_ids = (slot - self.pad_counts).clamp(min=0)[:, None]
        if not prefill and self.graphs:
            logits, h = _graphed_step(self.model)(self.model, idx, input_pos, position_ids, self.key_mask)
            # Outputs of a captured graph are overwritten by the next replay: copy them out.
            return logits[:, -1].float().clone(), (h.clone() if hidden else None)
        if not prefill and self.backend == "compiled":
            logits, h = self._cpu_compiled(idx, input_pos, position_ids, self.key_mask[:, :slot + 1].bool())
            return logits, (h if hidden else None)
        mask = self.key_mask[:, None, None, :slot + 1].bool() if T == 1 else None  # every real slot up to its own
        logits, h = self.model(idx, input_pos=input_pos, position_ids=position_ids, attention_mask=self.key_mask,
                               kv_len=slot + T, mask=mask, return_hidden=True, last_token_only=last_only,
                               head_t=self.head_t)
        return logits[:, -1].float(), h

    def copy_rows(self, index: torch.Tensor) -> None:
        """Row r takes row index[r]'s cache (and padding): beam and contrastive reorders."""
        for c in self.caches:
            c.copy_rows(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
            self.pad_counts = self.pad_counts.index_select(0, index)

    def close(self) -> None:
        if self.native is not None:
            self.native.set_cache([])
        if not self.keep:
            self.model.clear_kv_cache()

    # Compiled steps ----------------------------------------------------------------------------------------
    def _cpu_compiled(self, idx, input_pos, position_ids, mask):
        """The CPU decode step compiled by inductor. The mask's length is the filled length: a dynamic
        dimension, so one graph serves every step and attention reads the slots filled so far."""
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        if self._cpu_step is None:
            self._cpu_step = _compiled_cpu_step(self.model)
        return self._cpu_step(idx, input_pos, position_ids, mask)


def _clone_sharing_weights(model):
    """A copy of the module tree whose parameters and buffers are the original's tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for name, value in vars(model).items():
        if name.startswith("_gptgen_"):  # per-model caches (transposed head, compiled steps)
            memo[id(value)] = None
    clone = copy.deepcopy(model, memo)
    for name in [n for n in vars(clone) if n.startswith("_gptgen_")]:
        delattr(clone, name)
    return clone


def _cpu_decode_step(model, idx, input_pos, position_ids, mask, head_t):
    """One token per row over the cache, attending the first mask.shape[1] slots (the filled length)."""
    x = model.hidden_states(idx, position_ids=position_ids, input_pos=input_pos, kv_len=mask.shape[1],
                            mask=mask[:, None, None, :])
    # float32 logits out of the graph: the conversion runs as compiled code (eagerly it is ~1 ms at 16 rows)
    return model.lm_logits(x, head_t)[:, -1].float(), x


def _graph_body(model, idx, input_pos, position_ids, attention_mask):
    return model(idx, input_pos=input_pos, position_ids=position_ids, attention_mask=attention_mask,
                 return_hidden=True, last_token_only=True)


def _graphed_step(model, dynamic=None):
    """The decode step compiled with CUDA graphs, kept on the module per `dynamic`."""
    steps = model.__dict__.setdefault("_gptgen_graph_steps", {})
    if dynamic not in steps:
        steps[dynamic] = torch.compile(_graph_body, mode="reduce-overhead", fullgraph=True, dynamic=dynamic)
    return steps[dynamic]


# Weights frozen into the graph as constants; GEMMs (also int8 weight-only ones) chosen among inductor's
# C++ templates (AMX micro-kernels where the CPU has them) and ATen by timing them.
#
# No compiled-graph caches: a graph with frozen weights holds the weights, but the caches key a graph by its
# code and shapes. Inductor skips its FX graph cache for frozen parameters, not for frozen buffers, and
# Int8Linear's weights are buffers: a second int8 model of the same shape, in the same process or a later
# one, got the first model's compiled graph, weights and all (torch 2.13; greedy tokens diverged after one
# token, logits off by ~2.8 at magnitude ~2). Autotuning results (which kernel is fastest for a shape) are
# still cached.
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                       "fx_graph_cache": False}
# int8 weight-only products: inductor's C++ templates only (the setting the int8 figures in
# docs/performance.md were measured with).
CPU_COMPILE_OPTIONS_INT8 = dict(CPU_COMPILE_OPTIONS, max_autotune_gemm_backends="CPP")

# The weights are frozen into the graph and the step is rebuilt when they change (weights_key), so the
# per-call guards on every parameter (~0.25 ms a call) are dropped.
_GUARD_OPTIONS = ({"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
                  if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe") else None)

_STEP_IDS = itertools.count()


def _compiled_cpu_step(model):
    """The CPU decode step compiled by inductor (C++ kernels, no per-op Python dispatch), kept on the model
    and rebuilt when the weights change. The first call compiles (seconds); later calls reuse it."""
    key = weights_key(model)
    cached = model.__dict__.get("_gptgen_cpu_step")
    if cached is None or cached[0] != key:
        require_cxx_compiler()
        head_t = model.transposed_head()

        def step(*args):  # the model from the closure: its weights freeze
            return _cpu_decode_step(model, *args, head_t)

        # A code object of its own per model: dynamo keeps its compiled graphs per code object, so models
        # compiled one after another in a process do not add up to its recompile limit.
        step.__code__ = step.__code__.replace(co_name=f"gptgen_cpu_step_{next(_STEP_IDS)}")
        int8 = any(isinstance(getattr(mod, "weight_int8", None), torch.Tensor) for mod in model.modules())
        options = dict(CPU_COMPILE_OPTIONS_INT8 if int8 else CPU_COMPILE_OPTIONS, **(_GUARD_OPTIONS or {}))
        compiled = torch.compile(step, fullgraph=True, options=options)
        config = torch._inductor.config

        def run(*args):
            # Inductor applies the options when it compiles, but dynamo reads `freezing` from the global
            # config while it traces (to treat the weights as constants), which may be on any call (a new
            # shape): set on every call, as one attribute (a config.patch of all options cost ~25 us a call).
            before = config.freezing
            config.freezing = True
            try:
                return compiled(*args)
            finally:
                config.freezing = before

        cached = (key, run)
        model.__dict__["_gptgen_cpu_step"] = cached
    return cached[1]
