"""Show that moving LoRA, adapters and MoE into ``clipcl.adapt`` changed no number.

Builds the tiny open_clip model, injects LoRA, parallel adapters or MoE experts and routers under a
fixed seed (through the module-level API and through fine-tuning's ``inject_peft``), runs a few
AdamW steps (MoE with router noise and expert dropout on), and saves every state_dict entry and every
step's outputs. Run it on two trees and compare::

    PYTHONPATH=/path/to/old/src python benchmarks/adapt_unchanged.py --out /tmp/old.pt
    PYTHONPATH=src python benchmarks/adapt_unchanged.py --out /tmp/new.pt
    python benchmarks/adapt_unchanged.py --compare /tmp/old.pt /tmp/new.pt

It imports from ``clipcl.adapt`` when that exists and from the old ``clipcl.models.peft`` /
``clipcl.models.moe_adapters`` otherwise, so the same file runs on both trees.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

STEPS = 4
TEXTS = ["a photo of a cat.", "a blurry picture of a dog", "an airplane", "a red car"]


def _api():
    try:
        from clipcl.adapt import default_targets, inject
        from clipcl.adapt.moe import active_router, inject_moe_adapters
        tree = "clipcl.adapt"
    except ImportError:
        from clipcl.models.moe_adapters import active_router, inject_moe_adapters
        from clipcl.models.peft import default_targets, inject
        tree = "clipcl.models.peft"
    return tree, inject, default_targets, inject_moe_adapters, active_router


def _train(backend, layers=None, active_router=None) -> list[torch.Tensor]:
    """A few AdamW steps on a contrastive loss; returns each step's loss, image and text features."""
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    tokens = backend.tokenize(TEXTS)
    parameters = [parameter for parameter in backend.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=5e-2, weight_decay=0.01)
    outputs = []
    backend.train()
    for _ in range(STEPS):
        if layers is not None:
            with active_router(layers, 0, training=True):
                image_features, text_features = backend.encode_image(images), backend.encode_text(tokens)
        else:
            image_features, text_features = backend.encode_image(images), backend.encode_text(tokens)
        logits = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T * 10.0
        loss = F.cross_entropy(logits, torch.arange(len(TEXTS)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        outputs += [loss.detach(), image_features.detach(), text_features.detach()]
    backend.eval()
    with torch.no_grad():
        if layers is not None:
            with active_router(layers, 0):
                outputs += [backend.encode_image(images), backend.encode_text(tokens)]
        outputs += [backend.encode_image(images), backend.encode_text(tokens)]
    return outputs


def run() -> dict[str, object]:
    from clipcl.models.tiny import tiny_open_clip_backend
    from clipcl.strategies.finetune import FinetuneConfig, inject_peft

    tree, inject, default_targets, inject_moe_adapters, active_router = _api()
    results: dict[str, object] = {"tree": tree}
    cases = {
        "lora": lambda b: inject(b, "lora", default_targets(b, "lora"), rank=4, alpha=8.0),
        "adapter": lambda b: inject(b, "adapter", default_targets(b, "adapter"), bottleneck=8, dropout=0.1),
        "lora+adapter": lambda b: (inject(b, "lora", ["*.attn"], rank=2, alpha=2.0),
                                   inject(b, "adapter", ["model.visual.*.resblocks.1.attn"], bottleneck=4)),
        "finetune-lora": lambda b: inject_peft(b, FinetuneConfig(name="finetune", peft="lora")),
        "finetune-adapter-image": lambda b: inject_peft(b, FinetuneConfig(name="finetune", peft="adapter",
                                                                          train="image")),
    }
    for name, build in cases.items():
        backend = tiny_open_clip_backend(seed=0)
        torch.manual_seed(1)
        backend.requires_grad_(False) if name.startswith("finetune") else None
        build(backend)
        if name.startswith("finetune"):
            chosen = {id(p) for p in backend.parameters() if p.requires_grad}
            backend.requires_grad_(False)
            for parameter in backend.parameters():
                parameter.requires_grad_(id(parameter) in chosen)
        results[name] = {"outputs": _train(backend), "state": dict(backend.state_dict()),
                         "trainable": [n for n, p in backend.named_parameters() if p.requires_grad]}
    for towers in (("image", "text"), ("text",)):
        backend = tiny_open_clip_backend(seed=0)
        torch.manual_seed(2)
        backend.requires_grad_(False)
        layers = inject_moe_adapters(backend, towers, num_experts=4, top_k=2, bottleneck=8)
        for layer in layers:
            layer.add_router()
        torch.manual_seed(3)
        results[f"moe-{'+'.join(towers)}"] = {
            "outputs": _train(backend, layers, active_router), "state": dict(backend.state_dict()),
            "counts": [layer.selection_counts.clone() for layer in layers],
            "trainable": [n for n, p in backend.named_parameters() if p.requires_grad]}
    return results


def compare(first: str, second: str) -> int:
    old, new = torch.load(first, weights_only=False), torch.load(second, weights_only=False)
    print(f"{first}: {old.pop('tree')}  vs  {second}: {new.pop('tree')}")
    failures = 0
    for case in old:
        a, b = old[case], new.get(case)
        problems = []
        if b is None:
            problems.append("missing")
        else:
            if list(a["state"]) != list(b["state"]):
                problems.append(f"state_dict keys differ: {sorted(set(a['state']) ^ set(b['state']))[:4]}")
            else:
                problems += [f"{key} differs" for key in a["state"] if not torch.equal(a["state"][key], b["state"][key])]
            if a["trainable"] != b["trainable"]:
                problems.append("trainable parameters differ")
            problems += [f"output {i} differs" for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"]))
                         if not torch.equal(x, y)]
            if len(a["outputs"]) != len(b["outputs"]):
                problems.append("output counts differ")
            if "counts" in a and not all(torch.equal(x, y) for x, y in zip(a["counts"], b["counts"])):
                problems.append("expert selection counts differ")
        failures += bool(problems)
        print(f"{case:24s} {'identical' if not problems else 'DIFFERENT: ' + '; '.join(problems[:5])}"
              f"  ({len(a['state'])} state entries, {len(a['outputs'])} outputs)")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write this tree's results here")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two result files exactly")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("pass --out FILE or --compare OLD NEW")
    torch.set_num_threads(1)
    torch.save(run(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
