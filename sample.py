"""
The decode loop, written out by hand (no model.generate) because PILAF needs something generate
does not do: step several causal LMs in lock-step and sample each row's token from its own mix of
their logits,

    row b's next token ~ softmax( sum_m w[b, m] * log_softmax(h_m) / T )        w: (B, M)

    vanilla  w[b] = (1,)               the policy alone
    pi+      w[b] = (1 + beta, -beta)  policy and reference: extrapolate away from the reference
    pi-      w[b] = (1 - beta, +beta)  policy and reference: interpolate toward the reference
    pi       w[b] = (1, 0)             the policy alone, in a batch that also holds pi+- rows

(paper Sec. 4). Log-probs or raw logits give the same distribution: a log_softmax only shifts each
row by a constant, which the outer softmax removes. A model whose weight is 0 in a row never reads
that row: each model is stepped only on the rows that use it, with a KV cache over just those rows.
So one loop makes a whole PILAF batch at exactly Table 1's cost: the reference is stepped on the
pi+- rows and nowhere else.

Batches hold different prompts, left-padded. GPT-2's positions are absolute, so position ids come
from the attention mask (the first real token of every row is position 0): `positions`, the one
formula that sampling here and scoring in dpo.py both use, so the two see the same positions.

Read `slow_generate` first: the plain loop, which re-reads every row's whole sequence through every
model at every step. `generate` is the same loop made fast (a KV cache per model, each model stepped
only on its rows), and must equal it token for token: the tests hold it to that.
"""
import torch
import torch.nn.functional as F

import ddp
from errors import Stop

def positions(mask):
    """Position ids from an attention mask: the first real token of each row is 0. (B, T) -> (B, T)"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)

def mix(logits, coefs, temperature=1.0):
    """The formula above, written plainly: log-probs of the sampling distribution from each model's
    next-token logits, (B, V) each -> (B, V); a coefficient is a number or a (B, 1) column (one per
    row). generate computes the same distribution from raw logits (see _decode)."""
    z = sum(c * F.log_softmax(_f32(h), dim=-1) for c, h in zip(coefs, logits))
    return F.log_softmax(z / temperature if temperature > 0 else z, dim=-1)

@torch.no_grad()
def slow_generate(models, weights, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature=1.0,
                  generator=None):
    """The plain loop that generate must equal: no cache, no choice of rows; at every step every model
    reads every row's prompt and response so far, and each row's token is drawn from mix() of their
    last logits with the row's weights. Arguments and returns as generate's."""
    B, dev = prompt_ids.shape[0], prompt_ids.device
    w = torch.as_tensor(weights, dtype=torch.float64).to(dev).expand(B, len(models))   # (B, M)
    eos = torch.tensor(eos_id, device=dev).view(-1)
    ids, mask = prompt_ids[:, :0], prompt_mask[:, :0].long()                              # (B, 0): nothing yet
    logps = torch.zeros(B, 0, dtype=torch.float64, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        x, attn = torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask.long(), mask], 1)   # (B, P + t)
        logits = [m(input_ids=x, attention_mask=attn, position_ids=positions(attn)).logits[:, -1] for m in models]
        lp = mix(logits, [w[:, i, None] for i in range(len(models))], temperature)          # (B, V)
        tok = draw(lp.exp(), generator) if temperature > 0 else lp.argmax(-1)               # (B,)
        ids = torch.cat([ids, tok.masked_fill(done, pad_id)[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        logps = torch.cat([logps, lp.gather(-1, tok[:, None]).masked_fill(done[:, None], 0.0).double()], 1)
        done = done | torch.isin(tok, eos)
        if done.all():
            break
    return ids, mask, logps

def _f32(h):
    # at least float32: bf16 log-probs would blur the small beta-weighted differences between models
    return h.to(torch.promote_types(h.dtype, torch.float32))

def _search(cum, u):
    """Index of the first cumulative mass above u, per row: (B, n), (B, 1) -> (B, 1). u is kept inside
    [0, total), so rounding can never land it on a token (or block) of probability 0."""
    u = torch.minimum(u.clamp(min=0), torch.nextafter(cum[:, -1:], torch.zeros_like(u)))
    return torch.searchsorted(cum, u, right=True)

NOT_FINITE = "no checkpoint holds non-finite weights: lower --lr, or start again with another --seed"

def draw(p, generator=None, block=256):
    """One exact draw per row from unnormalised probabilities p (B, V) -> (B,) token ids.

    Inverse CDF in two levels, one uniform per row: find the block of `block` tokens whose cumulative
    mass passes u, then the token inside that block. Two short cumulative sums instead of one over all
    V (faster than torch.multinomial at a large vocabulary: docs/performance.md), and exact (a token of
    probability 0 is never drawn; every other token with its probability, up to float64 rounding).
    """
    B, V = p.shape
    u = torch.rand(B, 1, generator=generator, device=p.device, dtype=torch.float64)    # (B, 1)
    if V <= block:                                                        # one block: a plain inverse CDF
        cum = p.double().cumsum(-1)                                       # (B, V)
    else:
        nb = -(-V // block)
        blocks = F.pad(p, (0, nb * block - V)).view(B, nb, block)        # (B, nb, block)
        cum = blocks.sum(-1, dtype=torch.float64).cumsum(-1)              # (B, nb)
    if not (torch.isfinite(cum[:, -1]).all() and (cum[:, -1] > 0).all()):   # NaN would draw garbage ids
        raise Stop("the policy's next-token distribution is not finite (NaN or infinite logits)", 1, NOT_FINITE)
    if V <= block:
        return _search(cum, u * cum[:, -1:]).squeeze(-1)
    u = u * cum[:, -1:]
    k = _search(cum, u)                                                   # (B, 1) the block past u
    u = u - F.pad(cum, (1, 0)).gather(1, k)                               # u's place inside that block
    inside = blocks[torch.arange(B, device=p.device), k[:, 0]]            # (B, block)
    return (k * block + _search(inside.double().cumsum(-1), u)).squeeze(-1)

def generate(models, weights, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id,
             temperature=1.0, generator=None):
    """Sample responses to a left-padded batch of prompts from per-row mixes of `models`.

    weights: M numbers (the same mix for every row) or a (B, M) tensor (one mix per row).
    prompt_ids, prompt_mask: (B, P), left-padded. temperature=0 decodes greedily. eos_id: one id, or a
    list of ids that each end a response (Llama-3 instruct models end a turn with <|eot_id|> or <|end_of_text|>).
    Returns ids (B, L) (pad_id after a row's EOS), mask (B, L) (1 on response tokens, EOS included)
    and logps (B, L): log-prob of each token under the distribution it was drawn from (0 where masked).
    """
    B, M, dev = prompt_ids.shape[0], len(models), prompt_ids.device
    w = torch.as_tensor(weights, dtype=torch.float64).to(dev)
    if w.shape not in ((M,), (B, M)):
        raise ValueError(f"weights must have shape ({M},) or ({B}, {M}) for {M} models and {B} prompts, got {tuple(w.shape)}")
    w = w.expand(B, M)
    if (w == 0).all(-1).any():
        raise ValueError("every row needs a nonzero weight on some model: a row of zeros samples from nothing")
    plain = M == 1 and bool((w == 1).all())        # one model, weight 1: its logits are the distribution
    # each model steps only on the rows that use it: (model, its rows, their weights (n_m, 1), all rows?); rows in
    # one contiguous range (all of them, or hybrid's halves) are a slice: views instead of copies
    steps = []
    for m in range(M):
        rows = (w[:, m] != 0).nonzero().squeeze(-1)
        if len(rows):
            lo, hi = rows[0].item(), rows[-1].item() + 1
            sel = slice(lo, hi) if hi - lo == len(rows) else rows
            steps.append((models[m], sel, w[rows, m, None], len(rows) == B))
        elif ddp.fsdp:   # no row of this rank uses the model, but its forward is a collective: it steps on a filler
            steps.append((models[m], slice(0, 1), None, False))
    eos = torch.tensor(eos_id, device=dev).view(-1)          # (E,) every id that ends a response
    with ddp.inference():   # inference mode: no autograd bookkeeping at all, less time per step than no_grad
        out = _decode(steps, plain, prompt_ids, prompt_mask, max_new_tokens, eos, pad_id, temperature, generator)
    return tuple(t.clone() for t in out)   # copies made outside inference mode are ordinary tensors: trainable on

def _decode(steps, plain, prompt_ids, prompt_mask, max_new_tokens, eos, pad_id, temperature, generator):
    """generate's loop: steps = [(model, its rows, their weights (n_m, 1), whether it reads every row)]."""
    (B, P), dev = prompt_ids.shape, prompt_ids.device
    caches = [None] * len(steps)
    attn = torch.cat([prompt_mask.long(), torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)], 1)  # (B, P + max)
    x = prompt_ids                                           # what the models read this step
    x_pos = positions(prompt_mask)                           # (B, P) the prompt's positions
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    ids, mask, logps = [], [], []
    # [every row has ended, model i has no row left to step]: on every rank under --fsdp, where each forward is a
    # collective and the ranks step in lock-step until all are done (ddp.everywhere: one reduction per step)
    idle = ddp.everywhere([False] + [wm is None for _, _, wm, _ in steps])
    for t in range(max_new_tokens):
        a = attn[:, :P + t]                                  # (B, P + t) a view: what the models may attend to
        z = None                                             # (B, V) the rows' mixed logits
        for i, (model, r, wm, every) in enumerate(steps):
            if idle[i + 1]:
                continue                                     # its rows have all ended: never needed again
            out = model(input_ids=x[r], attention_mask=a[r], position_ids=x_pos[r], cache=caches[i],
                        use_cache=True, logits_to_keep=1)    # only the last position is sampled from
            caches[i] = out.cache
            if wm is None:
                continue                                     # a filler step (--fsdp): nothing of it is used
            h = _f32(out.logits[:, -1])                      # (n_m, V)
            if plain:
                z = h
                continue
            # raw logits mix to the same distribution as log-probs (the log_softmax below removes each
            # row's shift), one pass over (n_m, V) fewer per model and step
            share = wm.to(h.dtype) * h                       # (n_m, V) this model's part of its rows' mix
            if z is None and every:
                z = share                                    # the first model reads every row
            else:
                z = torch.zeros(B, h.shape[-1], dtype=h.dtype, device=dev) if z is None else z
                z[r] += share
        if temperature > 0:
            lp = F.log_softmax(z if temperature == 1 else z / temperature, dim=-1)   # (B, V)
            tok = draw(lp.exp(), generator)                  # (B,)
        else:
            lp = F.log_softmax(z, dim=-1)
            tok = lp.argmax(-1)
        ids.append(tok.masked_fill(done, pad_id))
        mask.append(~done)
        logps.append(lp.gather(-1, tok[:, None]).squeeze(-1).masked_fill(done, 0.0))
        done = done | torch.isin(tok, eos)
        idle = ddp.everywhere([bool(done.all())] + [wm is None or bool(done[r].all()) for _, r, wm, _ in steps])
        if idle[0]:
            break
        # feed the new token; a finished row's filler token is masked out and never read again
        x = ids[-1][:, None]                                 # (B, 1)
        attn[:, P + t] = mask[-1]
        x_pos = x_pos[:, -1:] + 1                            # (B, 1) one past the row's last token
    return torch.stack(ids, 1), torch.stack(mask, 1).long(), torch.stack(logps, 1)
