"""Optimizers the trainer builds from a method's parameter groups (``Strategy.parameter_groups``)."""

from __future__ import annotations

import torch


class RowScaledAdamW(torch.optim.AdamW):
    """AdamW in which a group with ``row_scales`` (one ``[rows]`` tensor per parameter, or None) first
    decays each row by ``1 - lr * row_decay * scale`` and multiplies its gradient by ``scale``, then
    takes the plain Adam step with the group's own ``weight_decay`` (0 for such groups). This is
    CLL-CLIP's TEIR optimiser (official clfm/optimizers/AdamW.py:297-321, which also scales the
    gradient before the moments); groups without ``row_scales`` are plain AdamW groups."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter, scale in zip(group["params"], group.get("row_scales") or []):
                if parameter.grad is None or scale is None:
                    continue
                factor = scale.to(parameter.device, parameter.dtype).unsqueeze(-1)
                parameter.mul_(1.0 - group["lr"] * group["row_decay"] * factor)
                parameter.grad.mul_(factor)
        return super().step(closure)


__all__ = ["RowScaledAdamW"]
