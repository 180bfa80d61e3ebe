"""(2) The penalty's forward+backward on GPT-2 small / one forward+backward of GPT-2 small (batch 4 x 128).

GPT-2 small is built from `AutoConfig.for_model("gpt2")` (124M parameters, random init). Its 48 matrices in
scope are, per block, c_attn 768x2304, attn c_proj 768x768, c_fc 768x3072 and mlp c_proj 3072x768 (stored
(in, out) by `Conv1D`); every one has r = 768 coordinates after orientation. Side by side, interleaved:

* `model`: forward + backward of the causal-LM loss on random token ids, batch 4 x 128;
* `penalty`: `spectral_penalty(weight_matrices(model))` forward + backward (the library's hot path);
* `gram_products` (not `--quick`): only the Gram matrices C^T C of the stacked matrices, twice: the two
  m x r x r products per matrix that any exact forward+backward of logdet(R + eps I) needs (the Gram
  matrix, then a product with the r x r inverse for the gradient), i.e. the arithmetic floor of the penalty;
* `autograd_reference` (not `--quick`): the same formula written with plain tensor ops (center, standardize,
  Z^T Z / (m - 1), Cholesky, logdet) and differentiated by autograd, as the library did before.

Multiply-add counts are printed with the times: the penalty needs sum_l 2 m_l r_l^2 (+ O(r^3)), the model
3 x (tokens x (non-embedding matrices + tied LM head) + attention).
"""

from __future__ import annotations

import json

from timing import compare


def _model_macs(config, batch: int, seq: int) -> float:
    """Forward+backward multiply-adds of GPT-2 (backward = 2 x forward)."""
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    inner = config.n_inner or 4 * d
    per_token = layers * (d * 3 * d + d * d + 2 * d * inner) + d * vocab
    attention = batch * layers * 2 * seq * seq * d
    return 3.0 * (batch * seq * per_token + attention)


def _penalty_macs(matrices) -> dict:
    grams = sum(max(w.shape) * min(w.shape) ** 2 for w in matrices.values())
    cubic = sum(min(w.shape) ** 3 for w in matrices.values())
    return {"gram_products": 2.0 * grams, "cholesky_and_inverse_r3": cubic * (1 / 3 + 2 / 3)}


def _autograd_reference(matrices, eps: float = 1e-4):
    """The penalty formula with plain tensor ops and autograd (baseline for the analytic backward)."""
    import torch

    groups: dict = {}
    for w in matrices.values():
        groups.setdefault((max(w.shape), min(w.shape)), []).append(w if w.shape[0] >= w.shape[1] else w.t())
    total, count = 0.0, 0
    for stack in (torch.stack(ws) for ws in groups.values()):
        m, r = stack.shape[-2:]
        centered = stack - stack.mean(dim=-2, keepdim=True)
        Z = centered * (centered.pow(2).sum(dim=-2, keepdim=True) / (m - 1)).rsqrt()
        M = Z.mT @ Z / (m - 1) + eps * torch.eye(r)
        L = torch.linalg.cholesky(M)
        total = total + 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum() / r
        count += stack.shape[0]
    return -total / count


def run(quick: bool = False) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_specvol.spectral import spectral_penalty, weight_matrices

    config = AutoConfig.for_model("gpt2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    batch, seq = 4, 128
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    matrices = weight_matrices(model)

    def model_step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def penalty_step():
        model.zero_grad(set_to_none=True)
        spectral_penalty(weight_matrices(model)).backward()

    fns = {"model": model_step, "penalty": penalty_step}
    if not quick:
        stacks = {}
        for w in matrices.values():
            stacks.setdefault((max(w.shape), min(w.shape)), []).append(
                (w if w.shape[0] >= w.shape[1] else w.t()).detach())
        stacks = [torch.stack(ws) for ws in stacks.values()]

        def gram_products():
            for stack in stacks:
                stack.mT @ stack
                stack.mT @ stack

        def reference_step():
            model.zero_grad(set_to_none=True)
            _autograd_reference(weight_matrices(model)).backward()

        fns.update(gram_products=gram_products, autograd_reference=reference_step)
    times = compare(fns, repeats=2 if quick else 3, warmup=1)
    model_macs, penalty_macs = _model_macs(config, batch, seq), _penalty_macs(matrices)
    result = {
        "parameters": sum(p.numel() for p in model.parameters()), "matrices": len(matrices),
        "batch": batch, "seq_len": seq, "times": times,
        "penalty_over_model": times["penalty"]["median_s"] / times["model"]["median_s"],
        "macs": {"model_forward_backward": model_macs, **penalty_macs,
                 "gram_products_over_model": penalty_macs["gram_products"] / model_macs},
        "target_penalty_over_model": 0.15,
    }
    if not quick:
        result["gram_products_over_model"] = times["gram_products"]["median_s"] / times["model"]["median_s"]
        result["autograd_reference_over_model"] = (times["autograd_reference"]["median_s"]
                                                   / times["model"]["median_s"])
        # tokens per optimizer step at which the measured penalty would cost 15% of the model's step
        result["tokens_per_step_for_target"] = batch * seq * result["penalty_over_model"] / 0.15
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
