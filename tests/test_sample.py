"""The KV-cached decode loop against sample.slow_generate, the plain loop that recomputes the whole
sequence every step (stepping every model on every row); the draw against its distribution."""
import pytest
import torch
import torch.nn.functional as F

from conftest import BETA, EOS, H_POL, H_REF, PAD, PROMPTS, CountingLM, FixedLogits, left_padded, tiny_lm
from sample import draw, generate, mix, slow_generate

MIXES = {"vanilla": ((1.0,), 1), "pi+": ((1 + BETA, -BETA), 2), "pi-": ((1 - BETA, BETA), 2)}

@pytest.mark.parametrize("name", list(MIXES))
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_cached_equals_uncached(name, temperature):
    coefs, k = MIXES[name]
    models = [tiny_lm(1), tiny_lm(2)][:k]
    ids_p, mask_p = left_padded(PROMPTS)
    a = generate(models, coefs, ids_p, mask_p, 20, EOS, PAD, temperature, torch.Generator().manual_seed(0))
    b = slow_generate(models, coefs, ids_p, mask_p, 20, EOS, PAD, temperature, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=1e-10)
    assert a[1].sum() > len(PROMPTS)   # a real test: responses of more than one token

# one batch of PILAF's three kinds of rows, as pilaf.pilaf builds it: pi+, pi-, pi, pi, over prompts of
# different lengths; the reference has weight 0 on the pi rows and must never read them
ROW_WEIGHTS = torch.tensor([[1 + BETA, -BETA], [1 - BETA, BETA], [1.0, 0.0], [1.0, 0.0]] * 2, dtype=torch.float64)

@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_cached_equals_uncached_with_a_mix_per_row(temperature):
    models = [tiny_lm(1), tiny_lm(2)]
    ids_p, mask_p = left_padded(PROMPTS + PROMPTS[::-1])
    a = generate(models, ROW_WEIGHTS, ids_p, mask_p, 20, EOS, PAD, temperature, torch.Generator().manual_seed(0))
    b = slow_generate(models, ROW_WEIGHTS, ids_p, mask_p, 20, EOS, PAD, temperature, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=1e-10)
    assert a[1].sum() > 2 * len(PROMPTS)

def test_a_row_is_the_same_whatever_else_is_in_the_batch():
    """Greedy pi+ and pi rows decoded in one mixed batch equal the same rows decoded in batches of their own kind."""
    models = [tiny_lm(1), tiny_lm(2)]
    ids_p, mask_p = left_padded(PROMPTS + PROMPTS[::-1])
    both = generate(models, ROW_WEIGHTS, ids_p, mask_p, 12, EOS, PAD, temperature=0)
    for k, coefs in enumerate([(1 + BETA, -BETA), (1 - BETA, BETA), (1.0,)]):
        rows = [i for i in range(len(ROW_WEIGHTS)) if ROW_WEIGHTS[i].tolist() == list(coefs) + [0.0] * (2 - len(coefs))]
        assert len(rows) == (4 if k == 2 else 2)
        alone = generate(models[:len(coefs)], coefs, ids_p[rows], mask_p[rows], 12, EOS, PAD, temperature=0)
        L = alone[0].shape[1]
        assert torch.equal(both[0][rows, :L], alone[0]) and not both[1][rows, L:].any()
        torch.testing.assert_close(both[2][rows, :L], alone[2], rtol=0, atol=1e-10)

def test_a_model_reads_only_the_rows_that_use_it():
    pol, ref = CountingLM(tiny_lm(1)), CountingLM(tiny_lm(2))
    ids_p, mask_p = left_padded(PROMPTS + PROMPTS[::-1])
    ids, mask, _ = generate([pol, ref], ROW_WEIGHTS, ids_p, mask_p, 10, eos_id=99, pad_id=PAD,   # no EOS: all 10 steps
                            generator=torch.Generator().manual_seed(0))
    assert ids.shape[1] == 10
    assert pol.rows == 8 * 10 and ref.rows == 4 * 10     # the reference: only the 4 pi+- rows, every step

def test_a_model_stops_once_all_its_rows_have_ended():
    """pi+- rows that end early leave the reference idle for the rest of the batch; the result equals the slow loop's."""
    pol, ref = CountingLM(tiny_lm(3)), CountingLM(tiny_lm(4))
    ids_p, mask_p = left_padded(PROMPTS * 8)
    w = torch.tensor([[1 + BETA, -BETA]] * 2 + [[1.0, 0.0]] * 30, dtype=torch.float64)   # 2 pi+ rows, 30 pi rows
    out = generate([pol, ref], w, ids_p, mask_p, 30, EOS, PAD, 1.0, torch.Generator().manual_seed(0))
    slow = slow_generate([pol.model, ref.model], w, ids_p, mask_p, 30, EOS, PAD, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], slow[0]) and torch.equal(out[1], slow[1])
    steps, ref_steps = out[0].shape[1], int(out[1][:2].sum(-1).max())    # the loop's length; the pi+ rows' longest
    assert ref_steps < steps                                             # (this seed: the pi+ rows end first)
    assert ref.rows == 2 * ref_steps and pol.rows == 32 * steps

def test_weights_of_the_wrong_shape_or_all_zero_are_refused():
    models = [tiny_lm(1), tiny_lm(2)]
    ids_p, mask_p = left_padded(PROMPTS)
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(4, 2\)"):
        generate(models, torch.ones(3, 2), ids_p, mask_p, 4, EOS, PAD)
    with pytest.raises(ValueError, match=r"shape"):
        generate(models, (1.0,), ids_p, mask_p, 4, EOS, PAD)
    with pytest.raises(ValueError, match="nonzero weight"):
        generate(models, torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]]), ids_p, mask_p, 4, EOS, PAD)

def test_draw_is_exact():
    """The two-level inverse-CDF draw against the distribution it is given: rows of different shapes,
    a vocabulary that is not a multiple of the block, tokens of probability 0 at a block's end and start."""
    V, N = 1000, 40000
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, V, generator=g) ** 4                      # uneven, like a language model's next token
    p[:, 250:300] = 0                                           # zeros across the boundary of blocks 0 and 1
    p[1, :900] = 0                                              # row 1: all its mass in the last, partial block
    p[1, 990:] *= 50
    toks = draw(p.repeat_interleave(N, 0), g).view(2, N)        # (2, N)
    for row in range(2):
        q = (p[row] / p[row].sum()).double()
        freq = torch.bincount(toks[row], minlength=V).double() / N
        assert (freq[q == 0] == 0).all()                        # probability 0: never drawn
        common = q * N >= 5                                     # where a frequency is near normal: 4.5 standard errors
        assert ((freq - q).abs() <= 4.5 * (q * (1 - q) / N).sqrt())[common].all()
        rare = q[~common].sum()                                 # the rest, pooled
        assert abs(freq[~common].sum() - rare) <= 4.5 * (rare * (1 - rare) / N) ** 0.5
        # and as a whole: chi-square of the most likely tokens within its 99.99% range
        top = q.argsort(descending=True)[:20]
        chi2 = (((freq[top] - q[top]) * N) ** 2 / (q[top] * N)).sum().item()
        assert chi2 < 52, chi2                                  # chi2(20 dof) 99.99% point ~ 52

def test_padding_does_not_change_a_response():
    """Greedy decoding of a prompt alone equals its row in a left-padded batch of other prompts."""
    models = [tiny_lm(1), tiny_lm(2)]
    ids_p, mask_p = left_padded(PROMPTS)
    batch = generate(models, (1 + BETA, -BETA), ids_p, mask_p, 12, EOS, PAD, temperature=0)
    for i, p in enumerate(PROMPTS):
        alone = generate(models, (1 + BETA, -BETA), torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 12, EOS, PAD, 0)
        L = int(alone[1].sum())
        assert batch[0][i, :L].tolist() == alone[0][0, :L].tolist()
        torch.testing.assert_close(batch[2][i, :L], alone[2][0, :L], rtol=0, atol=1e-10)

def test_eos_masks_the_rest_and_stops_early():
    models = [tiny_lm(3)]
    ids_p, mask_p = left_padded(PROMPTS * 8)
    ids, mask, logps = generate(models, (1.0,), ids_p, mask_p, 40, EOS, PAD, 1.0, torch.Generator().manual_seed(1))
    for row, m, lp in zip(ids, mask, logps):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()            # mask is a prefix
        assert (row[n:] == PAD).all() and (lp[n:] == 0).all()
        eos_at = (row[:n] == EOS).nonzero()
        assert len(eos_at) <= 1 and (len(eos_at) == 0 or eos_at.item() == n - 1)   # EOS only last, and kept
    ended = (ids == EOS).any(-1)
    assert ended.any() and not ended.all() and ids.shape[1] == 40     # some rows ran to the end: all 40 steps
    # where every row ends, the loop stops with the last of them: a model that puts all its mass on EOS
    # ends every row at its first token, and the loop after one step
    sure = FixedLogits([0.0] + [-1e4] * 11)
    ids, mask, _ = generate([sure], (1.0,), ids_p, mask_p, 40, EOS, PAD, 1.0, torch.Generator().manual_seed(1))
    assert ids.shape[1] == 1 and (ids == EOS).all() and mask.all()

def test_any_of_several_eos_ids_ends_a_response():
    """A list of EOS ids (Llama-3's generation config has two): each one ends its row, kept as the last token."""
    models = [tiny_lm(3)]
    ids_p, mask_p = left_padded(PROMPTS * 8)
    ids, mask, _ = generate(models, (1.0,), ids_p, mask_p, 40, [EOS, 7], PAD, 1.0, torch.Generator().manual_seed(1))
    ends = set()
    for row, m in zip(ids, mask):
        n = int(m.sum())
        stops = [k for k in range(n) if row[k].item() in (EOS, 7)]
        assert stops in ([], [n - 1])        # an EOS id only as the last token, and the row stops there
        ends |= {row[n - 1].item()} if stops else set()
    assert ends == {EOS, 7}                  # both ids did end responses


def test_mix_matches_the_paper_formula():
    hp, hr = torch.tensor([H_POL]), torch.tensor([H_REF])
    plus = mix([hp, hr], (1 + BETA, -BETA))
    minus = mix([hp, hr], (1 - BETA, BETA))
    torch.testing.assert_close(plus, F.log_softmax((1 + BETA) * hp - BETA * hr, -1))
    torch.testing.assert_close(minus, F.log_softmax((1 - BETA) * hp + BETA * hr, -1))
    # pi+- = pi * exp(+-r) renormalised, with r = beta*log(pi/pi_ref) (paper arXiv 2502.04270 Sec. 4; pilaf.py docstring)
    r = BETA * (F.log_softmax(hp, -1) - F.log_softmax(hr, -1))
    torch.testing.assert_close(plus, F.log_softmax(F.log_softmax(hp, -1) + r, -1))
    torch.testing.assert_close(minus, F.log_softmax(F.log_softmax(hp, -1) - r, -1))
    torch.testing.assert_close(mix([hp], (1.0,), temperature=0.5), F.log_softmax(2 * hp, -1))

def test_sampled_tokens_follow_the_mixed_distribution():
    pol, ref = FixedLogits(H_POL), FixedLogits(H_REF)
    N = 20000
    ids, mask, _ = generate([pol, ref], (1 + BETA, -BETA), torch.full((N, 1), 3), torch.ones(N, 1, dtype=torch.long),
                            1, eos_id=99, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids[:, 0], minlength=5).double() / N
    p = F.softmax((1 + BETA) * torch.tensor(H_POL) - BETA * torch.tensor(H_REF), -1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / N).sqrt().max()   # within 4 standard errors
    assert pol.calls == 1 and ref.calls == 1   # one forward per model per token
