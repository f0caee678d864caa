"""pytorch/examples' DCGAN training step, kept as the baseline our step is measured and tested against.

Same networks and init as ours, but as the example writes it: D ends in a Sigmoid and is trained
with BCELoss, real and fake each get their own backward, and the G update computes D's weight
gradients too. Not for training: `Sigmoid` + `BCELoss` is unsafe under autocast.
"""

from __future__ import annotations

import torch
from torch import nn


class CanonicalStep:
    def __init__(self, g: nn.Module, d: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, nz: int):
        self.g, self.d = g, nn.Sequential(d, nn.Sigmoid())
        self.opt_g, self.opt_d, self.nz = opt_g, opt_d, nz
        self.criterion = nn.BCELoss()

    def __call__(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        n = real.shape[0]
        real_label = torch.full((n,), 1.0, device=real.device)
        fake_label = torch.full((n,), 0.0, device=real.device)
        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        self.d.zero_grad()
        output = self.d(real)
        err_d_real = self.criterion(output, real_label)
        err_d_real.backward()
        d_x = output.mean()
        noise = torch.randn(n, self.nz, 1, 1, device=real.device)
        fake = self.g(noise)
        output = self.d(fake.detach())
        err_d_fake = self.criterion(output, fake_label)
        err_d_fake.backward()
        d_g_z1 = output.mean()
        self.opt_d.step()
        # (2) Update G: maximize log(D(G(z)))
        self.g.zero_grad()
        output = self.d(fake)
        err_g = self.criterion(output, real_label)
        err_g.backward()
        self.opt_g.step()
        return {"loss_d": (err_d_real + err_d_fake).detach(), "loss_g": err_g.detach(),
                "d_real": d_x.detach(), "d_fake": d_g_z1.detach()}
