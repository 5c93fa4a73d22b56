"""bench.py's bad input: one line, exit code 2, before anything is built or timed. (Its figures are
measurements, printed by `python bench.py`; no test times anything.)"""
import pytest
import torch

import bench

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
