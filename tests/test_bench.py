"""bench.py's bad input: one line, exit code 2, before anything is built or timed. (Its figures are
measurements, printed by `python bench.py`; no test times anything.)"""
import pytest
import torch

import bench
from conftest import PAD, PROMPTS, CountingLM, left_padded, tiny_lm

@pytest.mark.parametrize("argv,match", [
    (["--size", "huge"], "invalid choice: 'huge'"),
    (["--device", "tpu"], "--device tpu is not available"),
    (["--reps", "0"], "--reps must be positive"),
] + ([(["--device", "cuda"], "--device cuda is not available")] if not torch.cuda.is_available() else []))
def test_bad_arguments_fail_in_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err

def test_the_floor_line_makes_the_pilaf_batchs_model_calls():
    """bench's "model calls alone" make the calls a PILAF pair batch makes when half its prompts draw
    (pi+, pi-): the same models in the same order, each on as many rows over as long a prefix, every step.
    (Which prompts the reference's rows hold differs, not their number or padded length.)"""
    import pilaf
    ids, mask = left_padded(PROMPTS * 2)                # 8 prompts of different lengths
    B, P = ids.shape
    order = []
    pol, ref = CountingLM(tiny_lm(1), order), CountingLM(tiny_lm(2), order)
    gen = lambda s: dict(max_new_tokens=5, eos_id=99, pad_id=PAD, temperature=1.0, generator=torch.Generator().manual_seed(s))
    seed = next(s for s in range(100) if pilaf.pilaf(pol, ref, ids, mask, 0.1, gen(s))["forwards"] == 3 * B)
    want = lambda rows: [((rows, 1 if t else P), (rows, P + t)) for t in range(5)]   # (tokens, mask) shapes per step
    for run in (lambda: pilaf.pilaf(pol, ref, ids, mask, 0.1, gen(seed)),
                lambda: bench.calls([(pol, slice(0, 2 * B)), (ref, slice(0, B))], ids.repeat(2, 1), mask.repeat(2, 1), 5)):
        for log in (pol.calls, ref.calls, order):
            log.clear()
        run()                                           # no EOS in the tiny vocabulary: every step taken
        assert pol.calls == want(2 * B) and ref.calls == want(B) and order == [pol, ref] * 5
