"""LoRA with a trainable student and an EMA teacher on the same frozen base weights.

D-OPSD needs two adapters on one model: the student (trained) and the teacher (an exponential moving
average of the student). Both live in one `LoRAModule` per target Linear, and a single switch on the
`LoRANetwork` picks which one a forward pass uses, so no base weight is ever copied or modified.

Two ways to attach, both leaving base parameters untouched:
- `LoRANetwork.attach(root)`: forward hooks on plain `nn.Linear` modules (y += scale * up(down(x))).
- `LoRAModule.weight_function`: `w -> w + delta` for hosts that rewrite weights at forward time
  (ComfyUI's `ModelPatcher.add_weight_wrapper`).
"""
import contextlib
import fnmatch
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("student", "teacher", "off")
INITS = ("default", "gaussian", "comfy")


class LoRAModule(nn.Module):
    """Low-rank delta `scale * up @ down` for one [out, in] weight, plus its EMA (teacher) copy."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 init: str = "default", dtype=torch.float32, device=None, generator=None,
                 parts: Optional[Sequence[str]] = None):
        """parts: names of equal row blocks of a fused weight (e.g. ("to_q", "to_k", "to_v") for a fused qkv
        Linear): one independent rank-`rank` LoRA per block, as the official code trains q, k and v, instead
        of one LoRA over the whole weight. Stored as one block-diagonal pair (down [n*r, in], up [out, n*r]
        with its off-diagonal blocks held at zero), so EMA, hooks and optimizers see two tensors as usual."""
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; choose one of {INITS}")
        self.parts = tuple(parts or ())
        n = max(1, len(self.parts))
        if out_features % n:
            raise ValueError(f"a {out_features}-row weight cannot be split into {n} equal parts {self.parts}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(alpha)
        self.down = nn.Parameter(torch.empty(rank * n, in_features, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.empty(out_features, rank * n, dtype=dtype, device=device))
        if self.parts:
            block = torch.ones(out_features // n, rank, dtype=dtype, device=device)
            self.register_buffer("up_mask", torch.block_diag(*[block] * n), persistent=False)
        else:
            self.up_mask = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init, generator)
        self.register_buffer("ema_down", self.down.detach().clone())
        self.register_buffer("ema_up", self.up.detach().clone())
        object.__setattr__(self, "network", None)  # a back-reference, not a submodule

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_parameters(self, init: str = "default", generator=None):
        """Start with a zero delta: 'default' (PEFT) and 'gaussian' zero `up`; 'comfy' zeroes `down`.
        'gaussian' is PEFT's init_lora_weights="gaussian" (down ~ N(0, (1/r)^2)), the official scripts' choice
        (ema_utils.py, init_dual_lora_transformer); 'default' is PEFT's kaiming-uniform."""
        if init == "comfy":
            bound = 1.0 / math.sqrt(self.rank)
            self.up.copy_(torch.rand(self.up.shape, generator=generator) * 2 * bound - bound)
            if self.up_mask is not None:
                self.up.mul_(self.up_mask)
            self.down.zero_()
            return
        if init == "gaussian":
            self.down.copy_(torch.randn(self.down.shape, generator=generator) / self.rank)
        else:  # kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT initialise lora_A
            bound = 1.0 / math.sqrt(self.in_features)
            self.down.copy_(torch.rand(self.down.shape, generator=generator) * 2 * bound - bound)
        self.up.zero_()

    def factors(self, mode: str):
        """(down, up) of the student or the EMA teacher (None for 'off'); up is block-diagonal for parts."""
        if mode == "student":
            down, up = self.down, self.up
        elif mode == "teacher":
            down, up = self.ema_down, self.ema_up
        else:
            return None
        return down, (up if self.up_mask is None else up * self.up_mask)

    def part_factors(self, mode: str):
        """[(part name or "", down [r, in], up [out/n, r])]: what a file stores, one entry per part."""
        down, up = self.factors(mode)
        if not self.parts:
            return [("", down, up)]
        n, r, rows = len(self.parts), self.rank, self.out_features // len(self.parts)
        return [(name, down[i * r:(i + 1) * r], up[i * rows:(i + 1) * rows, i * r:(i + 1) * r])
                for i, name in enumerate(self.parts)]

    def mode(self) -> str:
        return self.network.current_mode if self.network is not None else "student"

    def delta_output(self, x: torch.Tensor, mode: Optional[str] = None) -> Optional[torch.Tensor]:
        """scale * up(down(x)) in the LoRA's dtype, or None when the adapter is off."""
        mode = mode or self.mode()
        f = self.factors(mode)
        if f is None:
            return None
        down, up = f
        h = x.to(down.dtype)
        if mode == "student":
            h = self.dropout(h)
        return F.linear(F.linear(h, down), up) * self.scale

    def delta_weight(self, mode: Optional[str] = None) -> Optional[torch.Tensor]:
        f = self.factors(mode or self.mode())
        if f is None:
            return None
        down, up = f
        return (up @ down) * self.scale

    def weight_function(self, weight: torch.Tensor) -> torch.Tensor:
        """Host weight-wrapper form: returns weight + delta (a new tensor; the input is not modified)."""
        delta = self.delta_weight()
        if delta is None:
            return weight
        return weight + delta.to(weight.dtype).reshape(weight.shape)

    @torch.no_grad()
    def ema_update_(self, decay: float):
        self.ema_down.lerp_(self.down.detach().to(self.ema_down.dtype), 1.0 - decay)
        self.ema_up.lerp_(self.up.detach().to(self.ema_up.dtype), 1.0 - decay)

    @torch.no_grad()
    def ema_copy_(self):
        self.ema_down.copy_(self.down)
        self.ema_up.copy_(self.up)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_targets(root: nn.Module, targets: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 types=(nn.Linear,)) -> Dict[str, nn.Module]:
    """Modules of `types` whose dotted names match any `targets` glob and no `exclude` glob."""
    found = {n: m for n, m in root.named_modules()
             if n and isinstance(m, types) and _matches(n, targets) and not _matches(n, exclude)}
    if not found:
        raise ValueError(f"no {', '.join(t.__name__ for t in types)} module matches targets={list(targets)} "
                         f"exclude={list(exclude)}; check the patterns against the model's module names")
    return found


class AttachHandle:
    def __init__(self, hooks: List):
        self.hooks = hooks

    def remove(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []


def ema_decay_at(decay: float, warmup: bool, step: int) -> float:
    """The EMA decay used after optimizer step `step` (0-based); warm-up ramps it as (1+s)/(10+s) up to `decay`."""
    if warmup:
        return min(decay, (1.0 + step) / (10.0 + step))
    return decay


class LoRANetwork(nn.Module):
    """All LoRA modules of one model, the student/teacher/off switch and the EMA teacher update."""

    def __init__(self, modules: Dict[str, LoRAModule], ema_decay: float = 0.9999, ema_warmup: bool = False,
                 part_keys: Optional[Callable[[str, str], str]] = None):
        """part_keys(module name, part) -> the file key of one part of a split module (without
        '.lora_up.weight'); default: '<prefix><parent>.<part>', the part as a sibling of the fused module."""
        super().__init__()
        self.part_keys = part_keys
        self.names: List[str] = sorted(modules)
        self.loras = nn.ModuleList([modules[n] for n in self.names])
        for m in self.loras:
            object.__setattr__(m, "network", self)  # plain attribute: registering it would make a cycle
        self.ema_decay = float(ema_decay)
        self.ema_warmup = ema_warmup
        self.current_mode = "student"

    @classmethod
    def for_module(cls, root: nn.Module, rank: int = 8, alpha: Optional[float] = None,
                   targets: Sequence[str] = ("*",), exclude: Sequence[str] = (), dropout: float = 0.0,
                   init: str = "default", dtype=torch.float32, device=None, ema_decay: float = 0.9999,
                   ema_warmup: bool = False, seed: Optional[int] = None, types=(nn.Linear,),
                   split: Optional[Dict[str, Sequence[str]]] = None,
                   part_keys: Optional[Callable[[str, str], str]] = None) -> "LoRANetwork":
        """Build LoRA modules for every matching Linear of `root` (names are `root`'s module names).
        split: {glob: part names}: matching fused Linears get one LoRA per part (see LoRAModule)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        alpha = float(rank if alpha is None else alpha)
        mods = {}
        for name, m in find_targets(root, targets, exclude, types).items():
            parts = next((p for pattern, p in (split or {}).items() if fnmatch.fnmatchcase(name, pattern)), None)
            mods[name] = LoRAModule(m.in_features, m.out_features, rank, alpha, dropout, init, dtype,
                                    device if device is not None else m.weight.device, gen, parts)
        return cls(mods, ema_decay, ema_warmup, part_keys)

    def _key(self, prefix: str, name: str, part: str) -> str:
        """The file key (without '.lora_up.weight') of module `name`, or of one of its parts."""
        if not part:
            return prefix + name
        if self.part_keys is not None:
            return self.part_keys(name, part)
        return prefix + name.rsplit(".", 1)[0] + "." + part

    def __getitem__(self, name: str) -> LoRAModule:
        return self.loras[self.names.index(name)]

    def items(self):
        return zip(self.names, self.loras)

    @contextlib.contextmanager
    def mode(self, mode: str):
        """Run forward passes with the student, the EMA teacher, or no LoRA at all."""
        if mode not in MODES:
            raise ValueError(f"unknown LoRA mode {mode!r}; choose one of {MODES}")
        previous, self.current_mode = self.current_mode, mode
        try:
            yield self
        finally:
            self.current_mode = previous

    def predictors(self, student_fn: Callable, teacher_fn: Callable, teacher_mode: str = "teacher"):
        """(student, teacher): velocity callables fn(x, sigma) that run `student_fn` with the student LoRA and
        `teacher_fn` with the EMA teacher, the pair the objectives take. Conditioning is the callers' to close
        over (c_s in student_fn, c_t in teacher_fn). teacher_mode "off" makes the teacher the frozen base model
        (LoRA off: the on-policy retention term, dopsd_core/retention.py)."""
        if teacher_mode not in MODES:
            raise ValueError(f"unknown teacher_mode {teacher_mode!r}; choose one of {MODES}")

        def student(x, sigma):
            with self.mode("student"):
                return student_fn(x, sigma)

        def teacher(x, sigma):
            with self.mode(teacher_mode):
                return teacher_fn(x, sigma)

        return student, teacher

    def attach(self, root: nn.Module) -> AttachHandle:
        """Forward hooks on `root`'s Linear modules of the same names. Base parameters are untouched."""
        modules = dict(root.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"LoRA targets not found in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        hooks = []
        for name, lora in self.items():
            hooks.append(modules[name].register_forward_hook(_make_hook(lora)))
        return AttachHandle(hooks)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for m in self.loras for p in (m.down, m.up)]

    def ema_decay_at(self, step: int) -> float:
        return ema_decay_at(self.ema_decay, self.ema_warmup, step)

    @torch.no_grad()
    def ema_update(self, step: int = 0):
        decay = self.ema_decay_at(step)
        for m in self.loras:
            m.ema_update_(decay)

    @torch.no_grad()
    def ema_reset(self):
        """Teacher := student (the official code starts both adapters from the same weights)."""
        for m in self.loras:
            m.ema_copy_()

    def comfy_state_dict(self, prefix: str = "diffusion_model.", which: str = "student",
                         dtype=None) -> Dict[str, torch.Tensor]:
        """ComfyUI/kohya keys: <prefix><module>.lora_up.weight [out,r], .lora_down.weight [r,in], .alpha.
        A module with parts writes one LoRA per part under the sibling name <parent>.<part> (Z-Image:
        attention.to_q/to_k/to_v, which ComfyUI's loader maps onto the fused attention.qkv rows)."""
        if which not in ("student", "teacher"):
            raise ValueError("which must be 'student' or 'teacher'")
        sd = {}
        for name, m in self.items():
            for part, down, up in m.part_factors(which):
                key = self._key(prefix, name, part)
                sd[key + ".lora_up.weight"] = up.detach().to(dtype or up.dtype).clone().contiguous()
                sd[key + ".lora_down.weight"] = down.detach().to(dtype or down.dtype).clone().contiguous()
                sd[key + ".alpha"] = torch.tensor(m.alpha)
        return sd

    @torch.no_grad()
    def load_comfy_state_dict(self, sd: Dict[str, torch.Tensor], prefix: str = "diffusion_model.",
                              into: Iterable[str] = ("student", "teacher"), strict: bool = True):
        """Load ComfyUI-format factors; the rank and alpha of the file win (modules are resized).

        A resized module gets new Parameter objects: load before building a Trainer/optimizer on `net`.
        Loading into both student and teacher (the default) is the warm start for continuing a LoRA."""
        expected = {self._key(prefix, n, part) for n, m in self.items() for part in (m.parts or ("",))}
        present = {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_up.weight" in k or ".lora_down.weight" in k}
        if strict and present != expected:
            missing, extra = sorted(expected - present), sorted(present - expected)
            raise KeyError("LoRA keys do not match this model: "
                           f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                           f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name, m in self.items():
            if m.parts:
                self._load_parts(sd, prefix, name, m, into)
                continue
            key = prefix + name
            if key + ".lora_up.weight" not in sd:
                continue
            up, down = sd[key + ".lora_up.weight"], sd[key + ".lora_down.weight"]
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            if up.shape[0] != m.out_features or down.shape[1] != m.in_features:
                raise ValueError(f"LoRA for {name} has shape up{tuple(up.shape)} down{tuple(down.shape)}, "
                                 f"model weight is [{m.out_features}, {m.in_features}]")
            rank = down.shape[0]
            alpha = float(sd[key + ".alpha"]) if key + ".alpha" in sd else float(rank)
            if rank != m.rank:
                m.rank = rank
                m.down = nn.Parameter(torch.zeros(rank, m.in_features, dtype=m.down.dtype, device=m.down.device))
                m.up = nn.Parameter(torch.zeros(m.out_features, rank, dtype=m.up.dtype, device=m.up.device))
                m.ema_down = torch.zeros_like(m.down.detach())
                m.ema_up = torch.zeros_like(m.up.detach())
            m.alpha = alpha
            if "student" in into:
                m.down.copy_(down)
                m.up.copy_(up)
            if "teacher" in into:
                m.ema_down.copy_(down)
                m.ema_up.copy_(up)


    def _load_parts(self, sd, prefix: str, name: str, m: LoRAModule, into: Iterable[str]):
        """Per-part keys into a block-diagonal module; each part must have the module's rank and alpha."""
        r, rows = m.rank, m.out_features // len(m.parts)
        for i, part in enumerate(m.parts):
            key = self._key(prefix, name, part)
            if key + ".lora_up.weight" not in sd:
                continue
            up, down = sd[key + ".lora_up.weight"], sd[key + ".lora_down.weight"]
            alpha = float(sd[key + ".alpha"]) if key + ".alpha" in sd else float(down.shape[0])
            if tuple(up.shape) != (rows, r) or tuple(down.shape) != (r, m.in_features) or alpha != m.alpha:
                raise ValueError(f"LoRA {key} has up{tuple(up.shape)} down{tuple(down.shape)} alpha {alpha}; this "
                                 f"network trains it at rank {r}, alpha {m.alpha}: build it with the file's rank")
            for role, (d, u) in (("student", (m.down, m.up)), ("teacher", (m.ema_down, m.ema_up))):
                if role in into:
                    d[i * r:(i + 1) * r].copy_(down)
                    u[i * rows:(i + 1) * rows, i * r:(i + 1) * r].copy_(up)


def _make_hook(lora: LoRAModule):
    def hook(module, args, output):
        delta = lora.delta_output(args[0])
        if delta is None:
            return output
        return output + delta.to(output.dtype)
    return hook
