"""Guidance as wrappers from denoiser to denoiser, and how a guidance gradient meets the update."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from explore.denoisers import Cond, Denoiser, Prediction, autocast_context


class ClassifierFreeGuidance:
    """eps = eps_uncond + scale * (eps_cond - eps_uncond) (Ho & Salimans 2022).

    The unconditional prediction comes either from the same model with a null
    label (one batched forward) or from a second, unconditional model.
    Scale 1 is exactly the conditional model; scale 0 the unconditional one.

    The conditional prediction's classifier gradient, conflict flag and stats are
    kept, and the null label travels with the requested class (Cond.requested), so
    ClassifierGuidance inside gives the same steps as ClassifierGuidance outside (the
    order engine.plan() uses). Inside costs more on the one-network path at scales
    other than 0 and 1: the classifier runs on both stacked halves, twice its work.
    At scale 0 with a second model the conditional model is not run; a
    ClassifierGuidance inside attaches its gradient to the unconditional prediction.
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_class: int | None = None,
                 uncond_denoiser: Denoiser | None = None, rescale: float = 0.0):
        if (null_class is None) == (uncond_denoiser is None):
            raise ValueError("classifier-free guidance needs either a null class or an unconditional model")
        self.inner, self.scale, self.null_class, self.uncond = denoiser, float(scale), null_class, uncond_denoiser
        self.rescale = float(rescale)

    def _uncond_cond(self, cond: Cond) -> Cond:
        labels = None if self.uncond is not None else torch.full_like(cond.labels, self.null_class)
        return replace(cond, labels=labels, requested=cond.classes)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Prediction:
        if cond.labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        if self.scale == 1.0:
            return self.inner(x, t, cond)
        uncond = self._uncond_cond(cond)
        if self.scale == 0.0:
            if self.uncond is None:
                return self.inner(x, t, uncond)
            pred = self.uncond(x, t, uncond)
            return self.inner.guide(pred, x, t, cond) if isinstance(self.inner, ClassifierGuidance) else pred
        if self.uncond is not None:
            cond_pred, uncond_pred = self.inner(x, t, cond), self.uncond(x, t, uncond)
        else:
            both = self.inner(torch.cat([x, x]), torch.cat([t, t]), _stack(cond, uncond))
            cond_pred, uncond_pred = _half(both, 0), _half(both, 1)
        delta = cond_pred.eps - uncond_pred.eps
        eps = uncond_pred.eps + self.scale * delta
        if self.rescale:
            eps = rescaled(eps, cond_pred.eps, self.rescale)
        stats = {**cond_pred.stats, "cfg_delta_norm": delta.flatten(1).norm(dim=1)}
        return replace(cond_pred, eps=eps, stats=stats, cfg_eps=eps - cond_pred.eps)


def rescaled(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """CFG rescale (Lin et al. 2024) on the noise prediction: each image's guided prediction scaled to
    the standard deviation of its conditional one, blended with the unscaled by phi, against over-saturation."""
    std_cond = cond.flatten(1).std(dim=1).view(-1, *[1] * (cond.dim() - 1))
    std_guided = guided.flatten(1).std(dim=1).view(-1, *[1] * (guided.dim() - 1))
    return phi * guided * (std_cond / std_guided.clamp_min(torch.finfo(guided.dtype).tiny)) + (1 - phi) * guided


def dynamic_thresholded(x0: Tensor, percentile: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022): per image, s = the percentile of |x0| (at least 1); x0 clamped
    to [-s, s] and divided by s, so strong guidance pulls saturated pixels inwards instead of clipping them."""
    s = torch.quantile(x0.detach().flatten(1).abs().float(), percentile, dim=1).clamp_min(1.0)
    s = s.to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class GuidanceInterval:
    """Guidance only at timesteps low <= t <= high, the unguided denoiser elsewhere (Kynkaanniemi et al. 2024:
    guidance in a limited interval of noise levels improves sample and distribution quality)."""

    def __init__(self, guided: Denoiser, unguided: Denoiser, low: float, high: float):
        self.guided, self.unguided, self.low, self.high = guided, unguided, float(low), float(high)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Prediction:
        inside = self.low <= float(t.flatten()[0]) <= self.high  # every sampler evaluates all rows at one t
        return (self.guided if inside else self.unguided)(x, t, cond)


def _stack(a: Cond, b: Cond) -> Cond:
    def cat(u, v):
        return None if u is None else torch.cat([u, v])
    return Cond(cat(a.labels, b.labels), cat(a.low_res, b.low_res), cat(a.classes, b.classes))


def _half(pred: Prediction, i: int) -> Prediction:
    """The conditional (0) or unconditional (1) half of a prediction for a stacked [cond; uncond] batch."""
    def half(v):
        return None if v is None else v.chunk(2)[i]
    return replace(pred, eps=half(pred.eps), var_values=half(pred.var_values), grad=half(pred.grad),
                   cfg_eps=half(pred.cfg_eps), stats={k: half(v) for k, v in pred.stats.items()})


class ClassifierGuidance:
    """Attach scale * grad_x log p(y | x_t) from a noisy classifier (Dhariwal & Nichol 2021, Alg. 1-2).

    The samplers apply it: as a mean shift for ancestral sampling, in score form
    for the others. With method 'conflict' the gradient and the denoising term are
    combined by PixelAsParam's conflict projection (Dinh et al. 2023).
    Scale 0 reports the classifier's log p(y | x_t) without changing the sample.
    y is the requested class (Cond.classes), also where the network sees a null label.
    """

    def __init__(self, denoiser: Denoiser, classifier: torch.nn.Module, scale: float,
                 method: str = "standard", precision: torch.dtype | None = None):
        if method not in ("standard", "conflict"):
            raise ValueError(f"unknown guidance method {method!r}; expected 'standard' or 'conflict'")
        self.inner, self.classifier, self.scale, self.method = denoiser, classifier, float(scale), method
        self.precision = precision

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Prediction:
        if cond.classes is None:
            raise ValueError("classifier guidance needs class labels")
        return self.guide(self.inner(x, t, cond), x, t, cond)

    def guide(self, pred: Prediction, x: Tensor, t: Tensor, cond: Cond) -> Prediction:
        """`pred`, made at (x, t), with the classifier's log-probability and scaled gradient attached."""
        log_prob, grad = classifier_log_prob_and_grad(self.classifier, x, t, cond.classes,
                                                      with_grad=self.scale != 0.0, precision=self.precision)
        pred.stats["log_prob"] = log_prob
        if grad is not None:
            pred.grad = self.scale * grad
            pred.conflict_projection = self.method == "conflict"
            pred.stats["guidance_grad_norm"] = pred.grad.flatten(1).norm(dim=1)
        return pred


def classifier_log_prob_and_grad(classifier: torch.nn.Module, x: Tensor, t: Tensor, labels: Tensor,
                                 with_grad: bool = True, precision: torch.dtype | None = None):
    """Per-sample log p(y | x_t) and, optionally, d/dx of its sum over the batch."""
    with torch.enable_grad() if with_grad else torch.no_grad():
        x_in = x.detach().requires_grad_(with_grad)
        with autocast_context(x.device, precision):
            logits = classifier(x_in, t)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        selected = log_probs[torch.arange(len(labels), device=x.device), labels]
        grad = torch.autograd.grad(selected.sum(), x_in)[0].float() if with_grad else None
    return selected.detach(), grad


def combine(denoise_term: Tensor, guide_term: Tensor, conflict_projection: bool) -> Tensor:
    """denoise_term + guide_term, or PixelAsParam's conflict projection (Dinh et al. 2023).

    Per sample: when the two terms point against each other (negative inner
    product), each is projected onto the normal plane of the other before they
    are added; otherwise they are added unchanged.
    """
    if not conflict_projection:
        return denoise_term + guide_term
    d, g = denoise_term.flatten(1), guide_term.flatten(1)
    dot = (d * g).sum(1, keepdim=True)
    tiny = torch.finfo(d.dtype).tiny
    d_proj = d - dot / (g * g).sum(1, keepdim=True).clamp_min(tiny) * g
    g_proj = g - dot / (d * d).sum(1, keepdim=True).clamp_min(tiny) * d
    out = torch.where(dot < 0, d_proj + g_proj, d + g)
    return out.view_as(denoise_term)
