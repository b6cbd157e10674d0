"""Fidelity probes: each recipe on the same weights and batches as high precision.

For a checkpoint (of a BF16 run, or any run) and each recipe:
- per layer and GEMM, each quantized operand's alpha, SQNR, saturated and zeroed fractions
  (``quant_stats``, the same numbers as live telemetry);
- gradient fidelity per transformer layer: the cosine and the norm ratio of the recipe's
  gradient (all the layer's weights, concatenated) to the high-precision gradient.  A
  systematic shrinkage shows as a norm ratio below 1 that compounds from the last layer to
  the first, as dY passes through each layer's Dgrad;
- the forward loss difference to high precision.

Everything is a mean over the same ``batches`` x ``batch_size`` validation windows (the
stream's first ones, as evaluation uses), with SR keys fixed by (step 0, batch), so a probe
is a pure function of the checkpoint, the recipes and the windows.  The reference runs the
``bf16`` recipe, i.e. every GEMM in the run's precision (fp32, or bf16 under autocast).
"""
from __future__ import annotations

import math

import torch

from ..config import config_from_saved
from ..linear import quant_stats, set_quant_stats
from ..model import GPTModel
from ..parallel.build import build_model
from ..training.checkpoint_formats import read_checkpoint
from ..training.inference import resolve_checkpoint
from ..training.run_info import precision_label
from ..training.run_setup import make_batch, validation_dataset


def _model(cfg, recipe_spec, weights: dict, device) -> GPTModel:
    cfg.recipe = dict(recipe_spec)
    cfg.validate()
    [model] = build_model(cfg, device=device)
    # weights only: RHT signs and SR states belong to the recipe being probed, not the checkpoint's
    missing, unexpected = model.load_state_dict(weights, strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise ValueError(f"checkpoint weights do not fit the model: {bad[0]}")
    return model


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return f"layer {parts[1]}" if parts[0] == "layers" and len(parts) > 1 else parts[0]


def _run(model, batches, autocast, stats: bool):
    """Mean loss, per-parameter gradients (float64, summed over batches) and operand statistics."""
    model.train()
    set_quant_stats(model, stats)
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    losses, collected = [], []
    for i, (tokens, labels) in enumerate(batches):
        model.zero_grad(set_to_none=True)
        model.step_context.at(0, i)  # SR keys from (step 0, batch i): the same draws on every call
        with autocast:
            loss = model(tokens, labels=labels)
        loss.backward()
        losses.append(float(loss.detach()))
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad.double()
        if stats:
            collected.append(quant_stats(model))
    model.step_context.at(None)
    set_quant_stats(model, False)
    return math.fsum(losses) / len(losses), grads, collected


def _mean_stats(collected: list[dict]) -> dict:
    """Operand statistics averaged over batches: {module: {gemm: {role: {stat: mean}}}}."""
    out: dict = {}
    for rec in collected:
        for mod, gemms in rec.items():
            for gemm, row in gemms.items():
                for role, st in row.items():
                    if not isinstance(st, dict) or role == "ran":
                        continue
                    acc = out.setdefault(mod, {}).setdefault(gemm, {}).setdefault(role, {})
                    for k, v in st.items():
                        if v is not None:
                            acc.setdefault(k, []).append(v)
    return {m: {g: {r: {k: math.fsum(v) / len(v) for k, v in st.items()} for r, st in rows.items()}
                for g, rows in gemms.items()} for m, gemms in out.items()}


def _gradient_fidelity(ref: dict, got: dict) -> dict:
    """Per layer: cosine and norm ratio of the concatenated weight gradients."""
    layers: dict = {}
    for name, g_ref in ref.items():
        if not name.endswith("weight") or g_ref.dim() != 2:
            continue
        acc = layers.setdefault(_layer_of(name), [0.0, 0.0, 0.0])
        g = got[name]
        acc[0] += float((g * g_ref).sum())
        acc[1] += float((g * g).sum())
        acc[2] += float((g_ref * g_ref).sum())
    out = {}
    for layer, (dot, gg, rr) in layers.items():
        ok = gg > 0 and rr > 0
        out[layer] = {"cosine": dot / math.sqrt(gg * rr) if ok else None,
                      "norm_ratio": math.sqrt(gg / rr) if rr > 0 else None}
    return out


def run_probes(checkpoint, recipes: dict[str, dict], batches: int = 4, batch_size: int = 8,
               device: str | torch.device = "cpu", backend: str | None = None, console=print) -> dict:
    """Probe ``checkpoint`` (a checkpoint or run directory) with each recipe of ``recipes``
    (name -> recipe mapping as in a config's ``recipe:`` section)."""
    path = resolve_checkpoint(checkpoint)
    state = read_checkpoint(path)
    base = config_from_saved(state["config"])
    if backend is not None:
        base.gemm.backend = backend
    weights = {k: v for k, v in state["model"].items() if not k.endswith("_extra_state")}
    ds = validation_dataset(base)
    n = min(batches * batch_size, len(ds))
    data = [make_batch(ds, range(s, min(n, s + batch_size)), device) for s in range(0, n, batch_size)]
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=base.training.dtype == "bf16")
    ref_cfg = config_from_saved(state["config"])
    ref_model = _model(ref_cfg, {"name": "bf16"}, weights, device)
    ref_loss, ref_grads, _ = _run(ref_model, data, autocast, stats=False)
    del ref_model
    out = {"checkpoint": str(path), "step": int(state["step"]), "windows": n, "reference_loss": ref_loss,
           "reference": precision_label(ref_cfg.build_recipe()[0], base.training.dtype), "recipes": {}}
    for name, spec in recipes.items():
        cfg = config_from_saved(state["config"])
        if backend is not None:
            cfg.gemm.backend = backend
        model = _model(cfg, spec, weights, device)
        loss, grads, collected = _run(model, data, autocast, stats=True)
        label = precision_label(cfg.build_recipe()[0], cfg.training.dtype)
        out["recipes"][name] = {"label": label, "loss": loss, "loss_diff": loss - ref_loss,
                                "gradients": _gradient_fidelity(ref_grads, grads), "operands": _mean_stats(collected)}
        console(f"  probe {name} ({label}): loss {loss:+.5f} vs {ref_loss:.5f} (diff {loss - ref_loss:+.5f})")
        del model
    return out
