"""One GAN update in pure PyTorch (no Ray, no MLflow), so it can be tested and benchmarked alone.

Compared with pytorch/examples' loop it does the same math with less work:
- D sees the real and the fake batch in separate passes (separate batch-norm statistics, as in the
  paper), the first under DDP's `no_sync()`, so D's gradients are all-reduced once per step, not twice;
- during the G update D's weights are frozen and D is called outside its DDP wrapper, so no D
  weight gradient is computed or communicated;
- gradients are set to None rather than zeroed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce_logits

from dcgan_dist.config import Config, TrainConfig
from dcgan_dist.errors import CheckpointError
from dcgan_dist.models import build_discriminator, build_generator
from dcgan_dist.torch_utils import compile_models, resolve_precision, to_layout, unwrap


def make_optimizers(g: nn.Module, d: nn.Module, t: TrainConfig,
                    precision: str = "fp32") -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for each network, with its own learning rate (the paper: 2e-4, beta1 0.5). fp16 always takes the fused
    kernel: GradScaler then hands it the inf check on the device, where with plain Adam it reads the check back to
    the host at every step (a sync that stalls a GPU)."""
    fused = {"fused": True} if t.fused_adam or precision == "fp16" else {}
    opt_g = torch.optim.Adam(g.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2), **fused)
    opt_d = torch.optim.Adam(d.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2), **fused)
    return opt_g, opt_d


def apply_hparams(opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, t: TrainConfig) -> None:
    """Set the config's learning rates and betas after loading optimizer state from a checkpoint.

    A restored Adam state carries the old values; the config wins, so a resumed run (or a PBT
    trial continuing another trial's checkpoint with perturbed rates) runs what its config says.
    """
    for opt, lr in ((opt_g, t.lr_g), (opt_d, t.lr_d)):
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr, (t.beta1, t.beta2)


class GANStep:
    """Call with a batch of real images in [-1, 1]; returns detached scalar metrics.

    `g` and `d` may be DDP-wrapped; noise comes from the global torch RNG so a checkpoint
    of the RNG state makes the next step reproducible. `precision` bf16/fp16 runs the forward
    passes under autocast (losses in fp32); fp16 also scales the losses so small gradients survive,
    one scaler for both networks, updated once per step.
    """

    def __init__(self, g: nn.Module, d: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                 nz: int, precision: str = "fp32"):
        self.g, self.d, self.opt_g, self.opt_d, self.nz = g, d, opt_g, opt_d, nz
        self.precision = precision
        self.d_params = list(unwrap(d).parameters())
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = None
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(next(unwrap(g).parameters()).device.type)

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | str = "cpu", sync_batchnorm: bool = False) -> "GANStep":
        """The one way training, benchmarks and tests build G, D, their optimizers and the step from a config:
        seeded weights (identical on every rank), memory layout, torch.compile, precision ('auto' resolved)."""
        m, t = cfg.model, cfg.train
        if torch.device(device).type == "cuda":  # fixed shapes: let cuDNN time its conv algorithms once, keep the best
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(t.seed)
        g, d = build_generator(m), build_discriminator(m)
        if sync_batchnorm:
            g, d = nn.SyncBatchNorm.convert_sync_batchnorm(g), nn.SyncBatchNorm.convert_sync_batchnorm(d)
        g, d = to_layout(t.channels_last, g.to(device), d.to(device))
        compile_models(t.compile, g, d)
        precision = resolve_precision(t.precision, torch.device(device))
        return cls(g, d, *make_optimizers(g, d, t, precision), m.nz, precision)

    @property
    def device(self) -> torch.device:
        return next(unwrap(self.g).parameters()).device

    def wrap(self, fn) -> None:
        """Replace G and D by `fn(G)`, `fn(D)` (e.g. DDP wrappers); parameters and optimizers stay the same."""
        self.g, self.d = fn(self.g), fn(self.d)

    def state_dict(self) -> dict:
        """Both networks, both optimizers and the fp16 loss scale: what a resumed step needs."""
        return {"generator": unwrap(self.g).state_dict(), "discriminator": unwrap(self.d).state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict, t: TrainConfig | None = None) -> None:
        """Load what `state_dict` saved. The config's learning rates and betas (`t`) win over the saved ones, so a
        resumed run, or a PBT trial continuing another's checkpoint, runs what its config says. A checkpoint from
        another precision leaves the fp16 scaler at its default scale."""
        try:
            unwrap(self.g).load_state_dict(state["generator"])
            unwrap(self.d).load_state_dict(state["discriminator"])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint does not match the model config (model.* keys): {e}") from None
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if t is not None:
            apply_hparams(self.opt_g, self.opt_d, t)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def _freeze_d(self, frozen: bool) -> None:
        for p in self.d_params:
            p.requires_grad_(not frozen)

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _step(self, opt: torch.optim.Optimizer) -> None:
        self.scaler.step(opt) if self.scaler else opt.step()

    def __call__(self, real: torch.Tensor, weight: float = 1.0) -> dict[str, torch.Tensor]:
        """One D and one G update on this rank's batch. `weight` scales the gradients: a rank holding n of a global
        batch of G images across W ranks passes n * W / G, so DDP's mean over ranks is the mean over all G images
        when the ranks' batches differ in size (elastic training)."""
        n = real.shape[0]
        z = torch.randn(n, self.nz, device=real.device)
        with self._autocast(real.device):
            fake = self.g(z)
        ones = torch.ones(n, device=real.device)
        zeros = torch.zeros(n, device=real.device)

        # D: maximize log D(x) + log(1 - D(G(z))). Real and fake each get a forward and a backward
        # (one graph alive at a time, as in pytorch/examples); under DDP the first backward runs in
        # no_sync(), so the summed gradient is all-reduced once.
        self._freeze_d(False)
        self.opt_d.zero_grad(set_to_none=True)
        with getattr(self.d, "no_sync", contextlib.nullcontext)():
            with self._autocast(real.device):
                logits_real = self.d(real).float()
            loss_real = bce_logits(logits_real, ones)
            self._backward(loss_real * weight)
        with self._autocast(real.device):
            logits_fake = self.d(fake.detach()).float()
        loss_fake = bce_logits(logits_fake, zeros)
        self._backward(loss_fake * weight)
        self._step(self.opt_d)
        loss_d = loss_real.detach() + loss_fake.detach()

        # G: the non-saturating loss, maximize log D(G(z)), against the updated D.
        self._freeze_d(True)
        with self._autocast(real.device):
            logits_g = unwrap(self.d)(fake).float()
        loss_g = bce_logits(logits_g, ones)
        self.opt_g.zero_grad(set_to_none=True)
        self._backward(loss_g * weight)
        self._step(self.opt_g)
        self._freeze_d(False)
        if self.scaler:
            self.scaler.update()

        with torch.no_grad():
            return {
                "loss_d": loss_d.detach(),
                "loss_g": loss_g.detach(),
                "d_real": torch.sigmoid(logits_real.detach()).mean(),
                "d_fake": torch.sigmoid(logits_fake.detach()).mean(),
            }
