"""
DPO (Rafailov et al. 2023), the loss every sampler in this repo trains with:

    loss = -log sigmoid( beta*log(pi(y_w)/pi_ref(y_w)) - beta*log(pi(y_l)/pi_ref(y_l)) )

beta*log(pi/pi_ref) is the implicit reward r_theta; PILAF's pi+/pi- are pi*exp(+-r_theta) renormalised
token by token (paper Sec. 4), and Best-of-N ranks its candidates by it.
"""
import torch
import torch.nn.functional as F

def sequence_logps(model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Summed log-prob of each response given its prompt, teacher-forced in one forward pass.

    prompt_ids/mask: (B, P) left-padded; resp_ids/mask: (B, L) right-padded (EOS counted, padding not).
    Positions come from the attention mask, as in sample.generate, so the numbers match sampling.
    Returns (B,).
    """
    ids = torch.cat([prompt_ids, resp_ids], dim=1)                 # (B, P+L)
    attn = torch.cat([prompt_mask, resp_mask], dim=1).long()       # (B, P+L)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    P = prompt_ids.shape[1]
    logits = logits[:, P - 1:-1]                                   # (B, L, V) predicts each response token
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lp = torch.gather(F.log_softmax(logits, dim=-1), 2, resp_ids[:, :, None]).squeeze(-1)  # (B, L)
    return (lp * resp_mask).sum(-1)

def log_ratio(policy, ref, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """log pi(y|x) - log pi_ref(y|x) of whole responses (B,): beta times it is the implicit reward,
    its mean over policy samples the sequence KL."""
    return (sequence_logps(policy, prompt_ids, prompt_mask, resp_ids, resp_mask)
            - sequence_logps(ref, prompt_ids, prompt_mask, resp_ids, resp_mask))

def pad_to(x, L, value):
    """Right-pad (B, L0) to (B, L)."""
    return F.pad(x, (0, L - x.shape[1]), value=value)

def pad_cat(a, b, value):
    """Stack two right-padded (B, L1), (B, L2) tensors into one (2B, max(L1, L2))."""
    L = max(a.shape[1], b.shape[1])
    return torch.cat([pad_to(a, L, value), pad_to(b, L, value)])

def pair_logps(model, prompt_ids, prompt_mask, chosen, chosen_mask, rejected, rejected_mask, pad_id):
    """Log-probs of chosen and rejected responses from one concatenated forward. -> (B,), (B,)"""
    lp = sequence_logps(model, torch.cat([prompt_ids, prompt_ids]), torch.cat([prompt_mask, prompt_mask]),
                        pad_cat(chosen, rejected, pad_id), pad_cat(chosen_mask, rejected_mask, 0))
    return lp.chunk(2)

def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Per-example DPO losses (B,), and the implicit rewards of chosen and rejected (B,), detached."""
    chosen_r = beta * (pi_chosen - ref_chosen)
    rejected_r = beta * (pi_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_r - rejected_r)
    return losses, chosen_r.detach(), rejected_r.detach()

def reward_metrics(chosen_r, rejected_r):
    """Implicit-reward accuracy (chosen scored above rejected) and mean margin."""
    return dict(acc=(chosen_r > rejected_r).float().mean().item(), margin=(chosen_r - rejected_r).mean().item())
