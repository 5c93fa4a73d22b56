"""
The decode loop, written out by hand (no model.generate) because PILAF needs something generate
does not do: step several causal LMs in lock-step and sample each token from a mix of their logits,

    next token ~ softmax( sum_i c_i * log_softmax(h_i) / T )

    vanilla  c = (1,)               the policy alone
    pi+      c = (1 + beta, -beta)  policy and reference: extrapolate away from the reference
    pi-      c = (1 - beta, +beta)  policy and reference: interpolate toward the reference

(paper Sec. 4). Log-probs or raw logits give the same distribution: a log_softmax only shifts each
row by a constant, which the outer softmax removes. Every model keeps its own KV cache and reads the
same tokens.

Batches hold different prompts, left-padded. GPT-2's positions are absolute, so position ids come
from the attention mask (the first real token of every row is position 0), exactly as
dpo.sequence_logps computes them when it scores the same tokens later.
"""
import torch
import torch.nn.functional as F

def mix(logits, coefs, temperature=1.0):
    """Log-probs of the sampling distribution from each model's next-token logits. (B, V) each -> (B, V)."""
    # at least float32: bf16 log-probs would blur the small beta-weighted differences between models
    z = sum(c * F.log_softmax(h.to(torch.promote_types(h.dtype, torch.float32)), dim=-1) for c, h in zip(coefs, logits))
    return F.log_softmax(z / temperature if temperature > 0 else z, dim=-1)

@torch.no_grad()
def generate(models, coefs, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id,
             temperature=1.0, generator=None):
    """Sample responses to a left-padded batch of prompts from the mix of `models` with weights `coefs`.

    prompt_ids, prompt_mask: (B, P), left-padded. temperature=0 decodes greedily. eos_id: one id, or a
    list of ids that each end a response (Llama-3 instruct models end a turn with <|eot_id|> or <|end_of_text|>).
    Returns ids (B, L) (pad_id after a row's EOS), mask (B, L) (1 on response tokens, EOS included)
    and logps (B, L): log-prob of each token under the distribution it was drawn from (0 where masked).
    """
    assert len(models) == len(coefs) and len(models) > 0
    B = prompt_ids.shape[0]
    dev = prompt_ids.device
    attn = prompt_mask.long()                               # (B, P + t) grows by one column per step
    caches = [None] * len(models)
    x = prompt_ids                                          # what the models read this step
    x_pos = (attn.cumsum(-1) - 1).clamp(min=0)              # (B, P) the prompt's positions
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    eos = torch.tensor(eos_id, device=dev).view(-1)         # (E,) every id that ends a response
    ids, mask, logps = [], [], []
    for _ in range(max_new_tokens):
        logits = []
        for i, m in enumerate(models):
            out = m(input_ids=x, attention_mask=attn, position_ids=x_pos, past_key_values=caches[i], use_cache=True,
                    logits_to_keep=1)                   # only the last position is sampled from
            caches[i] = out.past_key_values
            logits.append(out.logits[:, -1])                # (B, V)
        lp = mix(logits, coefs, temperature)                # (B, V)
        if temperature > 0:
            tok = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)  # (B,)
        else:
            tok = lp.argmax(-1)
        alive = ~done
        ids.append(torch.where(alive, tok, pad_id))
        mask.append(alive.long())
        logps.append(torch.where(alive, lp.gather(-1, tok[:, None]).squeeze(-1), 0.0))
        done = done | torch.isin(tok, eos)
        if done.all():
            break
        # feed the new token; a finished row's filler token is masked out and never read again
        x = ids[-1][:, None]                                # (B, 1)
        attn = torch.cat([attn, mask[-1][:, None]], dim=-1)
        x_pos = attn.sum(-1, keepdim=True) - 1              # (B, 1) real tokens before this one
    return torch.stack(ids, 1), torch.stack(mask, 1), torch.stack(logps, 1)
