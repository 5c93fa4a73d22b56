"""train.py end to end on the tiny world, and its one-line errors for bad input."""
import json
import math
import os

import pytest
import torch
from datasets import Dataset, DatasetDict

import dpo
import load
import options
import pairs
import train
import world
from conftest import H_POL, H_REF, MICRO, FixedLogits, bad, read_jsonl, standin_reward_model, tiny_lm, world_args

def test_online_pilaf_run_writes_everything(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    last = train.main(["--sampler", "pilaf", "--out", out] + MICRO + world_args(tiny_world))
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    assert [m["labels"] for m in metrics] == [0, 16, 32] and [m["step"] for m in metrics] == [0, 2, 4]
    assert metrics[0]["kl"] == pytest.approx(0, abs=1e-5)       # the policy starts as the reference
    assert metrics[-1] == last and last["J"] == pytest.approx(last["reward"] - 0.1 * last["kl"])
    assert metrics[0]["kl_sampled"] == pytest.approx(0, abs=1e-5) and metrics[0]["kl_se"] == pytest.approx(0, abs=1e-5)
    assert metrics[0]["abs_r"] == pytest.approx(0, abs=1e-6) and 0 < last["abs_r"] <= 0.1 * 50   # beta * |log-ratio|
    assert all(0 < last[k] < 1 for k in ("reward_se", "J_se")) and last["kl_se"] > 0 and last["kl_sampled_se"] > 0
    assert len(pairs) == 32 and {p["chosen_src"] for p in pairs} <= {"pi", "pi+", "pi-"}
    assert 2 <= last["fwd_per_pair"] <= 4 and last["judged_per_label"] == 2
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["sampler"] == "pilaf"
    assert os.path.exists(os.path.join(out, "policy", "config.json"))
    assert json.load(open(os.path.join(out, "summary.json"))) == last

def test_iterative_starts_with_a_vanilla_round(tiny_world, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--sampler", "hybrid", "--mode", "iterative", "--iterations", "2", "--out", out] + MICRO + world_args(tiny_world))
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    assert {p["chosen_src"] for p in pairs if p["round"] == 0} == {"pi"}
    assert {p["chosen_src"] for p in pairs if p["round"] == 1} <= {"pi", "pi_ref"}
    assert any(p["chosen_src"] == "pi_ref" or p["rejected_src"] == "pi_ref" for p in pairs if p["round"] == 1)

def test_same_seed_same_numbers(tiny_world, tmp_path):
    runs = []
    for k in range(2):
        out = str(tmp_path / f"run{k}")
        train.main(["--sampler", "best_of_n", "--n", "3", "--out", out] + MICRO + world_args(tiny_world))
        runs.append([{k: v for k, v in m.items() if k not in ("time", "tok_per_s")}
                     for m in read_jsonl(os.path.join(out, "metrics.jsonl"))])
    assert runs[0] == runs[1]

@pytest.mark.parametrize("argv,match", [
    (["--sampler", "nope"], "invalid choice: 'nope'"),
    (["--mode", "offline"], "invalid choice: 'offline'"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--beta", "-0.1"], "--beta must be > 0"),
    (["--labels", "0"], "--labels must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--labels", "30", "--batch_size", "8"], "multiple of --batch_size"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be positive"),
    (["--xpo_alpha", "0.1"], "applies to --sampler hybrid only"),
    (["--device", "gpu"], "--device gpu is not available"),
    (["--judge", "some-rm"], "leave out --judge"),
    (["--oracle", "human", "--from_pairs", "pairs.jsonl"], "run it with plain python train.py"),
    (["--fsdp", "--reference", "behavior"], "which --fsdp does not shard"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(argv, match, capsys, tmp_path):
    out = str(tmp_path / "run")
    bad(argv + ["--out", out, "--world", str(tmp_path / "world")], capsys, match)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "world")

def test_bad_models_and_data_fail_in_one_line(tiny_world, capsys, tmp_path):
    out = str(tmp_path / "run")
    w = world_args(tiny_world)
    bad(["--out", out, "--max_new_tokens", "60"] + w, capsys, "lower --max_new_tokens to")
    bad(["--out", out] + w + ["--policy", str(tmp_path / "missing")], capsys, "missing' does not exist")
    bad(["--out", out] + w + ["--oracle", str(tmp_path)], capsys, "has no config.json")
    bad(["--out", out] + w + ["--prompt_column", "text"], capsys, "no column 'text'")
    assert not os.path.exists(out)
    d = str(tmp_path / "hh")
    DatasetDict(train=Dataset.from_dict({"chosen": ["x"]}), test=Dataset.from_dict({"chosen": ["y"]})).save_to_disk(d)
    bad(["--out", out] + w + ["--prompts", d], capsys, "--prompt_column")

def test_unreadable_model_folder_fails_in_one_line(tiny_world, capsys, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    bad(["--out", str(tmp_path / "run")] + world_args(tiny_world) + ["--oracle", str(broken)], capsys, "cannot load oracle")

def test_xpo_term_changes_the_hybrid_loss(tiny_world, tmp_path):
    """XPO adds alpha * log pi(y_ref) to the loss; with alpha = 0 it is plain DPO (log 2 at the first step)."""
    first = []
    for alpha in ("0", "1"):
        out = str(tmp_path / alpha)
        train.main(["--sampler", "hybrid", "--xpo_alpha", alpha, "--out", out] + MICRO + world_args(tiny_world)
                   + ["--labels", "8"])   # one DPO step, then the final evaluation logs its loss
        first.append(read_jsonl(os.path.join(out, "metrics.jsonl"))[1]["loss"])
    assert first[0] == pytest.approx(0.6931, abs=1e-3)     # one step on fresh pairs: policy == reference
    assert first[1] < first[0] - 1                           # log pi(y_ref) of a whole response is many nats below 0

def test_an_existing_run_is_never_overwritten_silently(tiny_world, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pairs.jsonl").write_text('{"prompt": "paid for"}\n')
    bad(["--out", str(out)] + world_args(tiny_world), capsys, "--overwrite")
    assert (out / "pairs.jsonl").read_text() == '{"prompt": "paid for"}\n'

def test_hub_style_models_and_hh_prompts(tiny_world, tmp_path):
    """The real-model path on local stand-ins: a policy tokenizer without a pad token (like GPT-2's),
    an oracle with its own tokenizer and no pad token, HH-RLHF-style dialogues as prompts."""
    policy, tok = load.load_policy(os.path.join(tiny_world, "policy"))
    tok.pad_token = None
    policy.save_pretrained(tmp_path / "gpt2-like")
    tok.save_pretrained(tmp_path / "gpt2-like")
    standin_reward_model(tmp_path / "rm", with_pad=False)
    hh = ["\n\nHuman: customer : my lamp arrived broken .\n\nAssistant: agent : sorry",
          "\n\nHuman: customer : my bike is missing !\n\nAssistant: agent : we will"]
    prompts = str(tmp_path / "hh")
    DatasetDict(train=Dataset.from_dict({"chosen": hh}), test=Dataset.from_dict({"chosen": hh[:1]})).save_to_disk(prompts)
    out = str(tmp_path / "run")
    last = train.main(["--policy", str(tmp_path / "gpt2-like"), "--oracle", str(tmp_path / "rm"), "--prompts", prompts,
                       "--prompt_column", "chosen", "--prompt_format", "hh", "--out", out] + MICRO)
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    assert len(pairs) == 32 and pairs[0]["prompt"].endswith("\n\nAssistant:")
    assert last["labels"] == 32
    # pad is EOS here (the tokenizer has no pad token): a response that ended keeps its EOS, never taken for padding
    eos = policy.config.eos_token_id
    ended = [r for p in pairs for r in (p["chosen_ids"], p["rejected_ids"]) if len(r) < 12]
    assert ended and all(r[-1] == eos and eos not in r[:-1] for r in ended)

def test_prompts_too_long_for_the_context_are_left_out(tiny_world, tmp_path, capsys):
    argv = ["--out", str(tmp_path / "run")] + MICRO + world_args(tiny_world)
    argv[argv.index("--max_new_tokens") + 1] = "52"      # context 64: prompts of more than 12 tokens cannot fit
    train.main(argv)
    assert "note: leaving out" in capsys.readouterr().out
    prompts = {p["prompt"] for p in read_jsonl(str(tmp_path / "run" / "pairs.jsonl"))}
    _, tok = load.load_policy(os.path.join(tiny_world, "policy"))
    assert prompts and max(len(tok(p)["input_ids"]) for p in prompts) <= 12

def test_init_from_another_vocabulary_fails_in_one_line(tiny_world, capsys, tmp_path):
    other = tmp_path / "other"
    tiny_lm(0).save_pretrained(other)
    world._word_tokenizer(["a", "b"]).save_pretrained(other)
    bad(["--out", str(tmp_path / "run"), "--init_from", str(other)] + world_args(tiny_world), capsys, "same vocabulary")

def test_bfloat16_learns_like_float32(tiny_world, tmp_path):
    """--dtype bfloat16 (reference and oracle in bf16, forwards under autocast, trained weights float32)
    must move the policy as far from the reference as float32 does, seen both in the weights and in
    what the forwards compute. The weight change alone would not catch a forward that keeps reading
    stale bf16 copies of the initial weights (autocast caches its casts until its context exits): the
    gradients still reach the float32 weights then, but KL stays 0."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_world, "policy"))
    moved = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / dtype)
        argv = ["--dtype", dtype, "--lr", "3e-3", "--out", out] + MICRO + world_args(tiny_world)
        argv[argv.index("--eval_samples") + 1] = "8"     # 64 evaluation samples: KL to about +-20%
        last = train.main(argv)
        saved = AutoModelForCausalLM.from_pretrained(os.path.join(out, "policy"), dtype="auto")   # the stored dtype
        assert next(saved.parameters()).dtype == torch.float32
        dw = sum((p - q).pow(2).sum() for p, q in zip(saved.parameters(), ref.parameters())).sqrt().item()
        moved[dtype] = (last["kl"], dw)
    (kl32, dw32), (kl16, dw16) = moved["float32"], moved["bfloat16"]
    assert kl32 > 0.2, moved                       # float32 moved the policy measurably
    assert 0.5 < kl16 / kl32 < 2, moved            # bf16 as far, in what its forwards see
    assert 0.8 < dw16 / dw32 < 1.25, moved         # and in the weights

@pytest.mark.parametrize("argv,match", [
    (["--oracle", "no-such-oracle"], "cannot load oracle 'no-such-oracle'"),
    (["--policy", "no-such-policy"], "cannot load policy 'no-such-policy'"),
    (["--prompts", "no-such-prompts"], "cannot load prompt data set 'no-such-prompts'"),
    (["--init_from", "./no-such-checkpoint"], "folder './no-such-checkpoint' does not exist"),
    (["--prompt_column", "text"], "have no column 'text'"),
    (["--prompts", "./no-such.jsonl"], "prompt data set './no-such.jsonl' does not exist"),
    (["--policy", "out/no/such/policy"], "policy folder 'out/no/such/policy' does not exist"),
])
def test_bad_names_fail_before_the_world_is_built(argv, match, capsys, tmp_path):
    """On a machine with nothing cached, a mistyped name must not cost a 3-minute world build first."""
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    bad(argv + ["--world", str(cache / "world"), "--out", str(tmp_path / "run")], capsys, match)
    assert os.listdir(cache) == [] and not os.path.exists(tmp_path / "run")

def test_a_policy_alone_says_what_it_falls_back_to(tiny_world, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(world, "ensure", lambda d: tiny_world)        # the tiny world stands in for the cache
    train.main(["--policy", os.path.join(tiny_world, "policy"), "--out", str(tmp_path / "run")] + MICRO + ["--labels", "8"])
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: --policy")]
    assert len(notes) == 1 and "--oracle or --prompts" in notes[0] and "oracle and prompts" in notes[0], notes

def test_a_response_ends_at_any_eos_id_of_the_generation_config(tiny_world, tmp_path):
    """Llama-3 lists several EOS ids in generation_config.json; every one ends a response, in sampling
    and in evaluation. Stand-in: the tiny world's policy with '.' (frequent in its replies) as a second EOS."""
    from transformers import AutoModelForCausalLM
    policy, tok = load.load_policy(os.path.join(tiny_world, "policy"))
    dot = tok.convert_tokens_to_ids(".")
    policy.generation_config.eos_token_id = [tok.eos_token_id, dot]
    policy.save_pretrained(tmp_path / "llama-like")
    tok.save_pretrained(tmp_path / "llama-like")
    assert load.eos_ids(AutoModelForCausalLM.from_pretrained(tmp_path / "llama-like"), tok) == sorted([tok.eos_token_id, dot])
    w = world_args(tiny_world)
    w[1] = str(tmp_path / "llama-like")
    out = str(tmp_path / "run")
    last = train.main(["--out", out] + MICRO + w)
    responses = [ids for p in read_jsonl(os.path.join(out, "pairs.jsonl")) for ids in (p["chosen_ids"], p["rejected_ids"])]
    ended = [r for r in responses if r[-1] == dot]
    assert ended                                              # '.' ends replies now
    assert all(dot not in r[:-1] and tok.eos_token_id not in r[:-1] for r in responses)   # and nothing runs past it
    assert last["eos"] > 0

def test_oracle_format_chat_needs_a_template(tiny_world, capsys, tmp_path):
    bad(["--oracle_format", "chat", "--out", str(tmp_path / "run")] + world_args(tiny_world), capsys, "has no chat template")

def test_the_loss_option_changes_the_update(tiny_world, tmp_path):
    """Same pairs, same seed: IPO's first-step loss is (0 - 1/(2 beta))^2 = 25 at the reference (D = 0),
    the hinge's is 1, DPO's log 2; and they move the policy differently (not at the first step: there
    every pair has D = 0, all three gradients point the same way, and AdamW's first step is the same)."""
    first, final = {}, {}
    for loss in ("dpo", "ipo", "hinge"):
        out = str(tmp_path / loss)
        train.main(["--loss", loss, "--out", out] + MICRO + world_args(tiny_world) + ["--eval_every", "8"])
        m = read_jsonl(os.path.join(out, "metrics.jsonl"))
        first[loss], final[loss] = m[1]["loss"], m[-1]["kl"]
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-3)
    assert first["ipo"] == pytest.approx(25, abs=1e-2) and first["hinge"] == pytest.approx(1, abs=1e-3)
    assert len({round(v, 6) for v in final.values()}) == 3

def test_a_behavior_reference_anchors_each_step_to_the_policy_that_sampled(tiny_world, tmp_path):
    """BPO, online: the loss's reference is the policy before the step, which also sampled the pairs,
    so every step's loss is measured at D = 0, log 2; with the initial reference the later steps are
    not. KL is still measured against the initial model, and the policy moves away from it."""
    runs = {}
    for ref in ("initial", "behavior"):
        out = str(tmp_path / ref)
        train.main(["--reference", ref, "--lr", "3e-3", "--out", out] + MICRO + world_args(tiny_world) + ["--eval_every", "8"])
        runs[ref] = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert all(m["loss"] == pytest.approx(math.log(2), abs=1e-5) for m in runs["behavior"][1:])
    assert all(m["margin"] == pytest.approx(0, abs=1e-6) for m in runs["behavior"][1:])
    assert max(abs(m["loss"] - math.log(2)) for m in runs["initial"][2:]) > 1e-3
    assert runs["behavior"][-1]["kl"] > 0.01 and runs["behavior"][-1]["kl"] != runs["initial"][-1]["kl"]

def test_behavior_reference_needs_the_sampling_policy(tiny_world, capsys, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    bad(["--reference", "behavior", "--from_pairs", str(pairs), "--out", str(tmp_path / "run")] + world_args(tiny_world),
        capsys, "--reference behavior anchors to the policy that sampled the pairs")

def test_evaluate_measures_the_kl_from_the_policy_to_the_reference():
    """Logits that do not depend on the input, and no EOS within reach: every response is 5 tokens, and
    each adds KL(pi || pi_ref) of the two fixed next-token distributions, whatever was sampled; the
    reverse KL(pi_ref || pi) is another number (0.765 against 0.726 here)."""
    class Tok:       # prompts are one token; a response decodes to its token ids
        pad_token_id, eos_token_id = 1, 99
        def __call__(self, texts, padding=True, return_tensors="pt"):
            return dict(input_ids=torch.full((len(texts), 1), 3), attention_mask=torch.ones(len(texts), 1, dtype=torch.long))
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids.tolist()))
    class Zero:
        def score(self, prompts, responses):
            return torch.zeros(len(prompts))
    lp, lq = torch.log_softmax(torch.tensor(H_POL, dtype=torch.float64), -1), torch.log_softmax(torch.tensor(H_REF, dtype=torch.float64), -1)
    kl, reverse = (lp.exp() * (lp - lq)).sum().item(), (lq.exp() * (lq - lp)).sum().item()
    assert abs(kl - reverse) > 0.02
    m = train.evaluate(FixedLogits(H_POL), FixedLogits(H_REF), Tok(), Zero(), ["p"] * 50, beta=0.1, samples=2,
                       max_new_tokens=5)
    assert m["len"] == 5 and m["kl"] == pytest.approx(5 * kl, rel=1e-6) and m["kl_se"] < 1e-6
    assert m["J"] == pytest.approx(-0.1 * 5 * kl, rel=1e-6)

def test_evaluate_standard_errors_hand_computed(tiny_world):
    """An oracle that scores response i as i: the reward's mean and standard error are those of
    0..N-1 (mean (N-1)/2, sd sqrt(N(N+1)/12), se sd/sqrt(N)); the policy is the reference, so both KL
    estimates and their errors are 0 and J's error is the reward's."""
    policy, tok = load.load_policy(os.path.join(tiny_world, "policy"))
    class Counting:
        def score(self, prompts, responses):
            return torch.arange(len(prompts), dtype=torch.float32)
    prompts = ["hello there", "my order is late", "reset my password"]
    m = train.evaluate(policy, policy, tok, Counting(), prompts, beta=0.1, samples=4, max_new_tokens=5)
    N = 12
    assert m["reward"] == pytest.approx((N - 1) / 2) and m["reward_se"] == pytest.approx(math.sqrt(N * (N + 1) / 12) / math.sqrt(N))
    assert m["kl"] == m["kl_sampled"] == m["kl_se"] == m["abs_r"] == 0 and m["J_se"] == pytest.approx(m["reward_se"])

def test_training_on_the_oracles_labels_raises_j_and_ranks_the_labelled_pairs(tmp_path, embedded_world):
    """What the loop is for, on the embedded world (built once and cached, as the notebooks use it):
    512 of the oracle's labels raise J well above the reference's (by more than 3 standard errors of the
    difference), and the trained policy's implicit rewards rank those labelled pairs right more often
    than chance (0.5: a reference that cannot tell two responses apart ranks none). Chosen and rejected
    swapped anywhere between labelling and the loss would train toward the rejected responses instead."""
    out = str(tmp_path / "run")
    train.main(["--sampler", "vanilla", "--labels", "512", "--out", out, "--world", embedded_world])
    m = read_jsonl(os.path.join(out, "metrics.jsonl"))
    first, last = m[0], m[-1]
    assert last["J"] - first["J"] > 3 * (first["J_se"] ** 2 + last["J_se"] ** 2) ** 0.5, (first, last)
    ref, tok = load.load_policy(json.load(open(os.path.join(out, "config.json")))["policy"])   # the world's reference
    policy, _ = load.load_policy(os.path.join(out, "policy"))
    labelled = pairs.read(os.path.join(out, "pairs.jsonl"), ref.config.vocab_size)
    tensors = pairs.collate(labelled, tok.pad_token_id, "cpu")
    with torch.no_grad():
        (pc, pr), (rc, rr) = dpo.pair_logps(policy, *tensors), dpo.pair_logps(ref, *tensors)
    acc = dpo.reward_metrics(*dpo.dpo_loss(pc, pr, rc, rr, 0.1)[1:])["acc"]
    assert acc > 0.5 + 3 * (0.25 / len(labelled)) ** 0.5, acc            # 3 standard errors above chance

@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_prompts_from_one_data_file(ext, tiny_world, tmp_path):
    """--prompts as one file of a format `datasets` reads: a fixed fifth of its rows is held out."""
    texts = [f"customer : my {i} item is missing . agent :" for i in range(50)]
    path = str(tmp_path / f"prompts.{ext}")
    ds = Dataset.from_dict({"prompt": texts})
    {"jsonl": ds.to_json, "json": lambda f: ds.to_json(f, lines=False), "csv": ds.to_csv, "parquet": ds.to_parquet}[ext](path)
    train_p, test_p = load.load_prompts(path)
    assert len(train_p) == 40 and len(test_p) == 10 and sorted(train_p + test_p) == sorted(texts)
    assert load.load_prompts(path) == [train_p, test_p]                     # the same rows held out every time
    last = train.main(["--prompts", path, "--out", str(tmp_path / "run")] + MICRO + world_args(tiny_world)[:4])
    assert last["labels"] == 32

def test_prompts_longer_than_the_context_say_so(tiny_world, capsys, tmp_path):
    prompts = str(tmp_path / "long.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps({"prompt": "sorry " * 100}) + "\n" for _ in range(10))
    bad(["--prompts", prompts, "--out", str(tmp_path / "run")] + MICRO + world_args(tiny_world)[:4], capsys,
        "every prompt of a split is as long as the policy's context (64 tokens) or longer")

def test_a_missing_model_is_said_before_the_run_folder(tiny_world, capsys, tmp_path):
    """The errors come in the order the user fixes them: the policy named wrong, before the folder's state."""
    out = str(tmp_path / "run")
    train.main(["--out", out] + MICRO + world_args(tiny_world))
    bad(["--out", out, "--policy", str(tmp_path / "missing")] + MICRO + world_args(tiny_world)[2:], capsys,
        "policy folder")

def test_a_person_is_told_how_many_pairs_they_will_label(capsys):
    options.get_args(["--oracle", "human", "--out", "unused"])
    assert "note: --oracle human: you will be asked to label 4096 pairs (--labels" in capsys.readouterr().out
    options.get_args(["--oracle", "human", "--labels", "64", "--out", "unused"])
    assert "note" not in capsys.readouterr().out

def test_a_pairs_loss_weight_scales_its_share_of_the_step(tiny_world, tmp_path):
    """t_pilaf --prompt_weight gives each pair a loss weight (pilaf.t_pilaf); train.update multiplies the
    pair's loss by it. Weights 2 and 0 on two pairs: the step of the first pair alone."""
    import copy
    import dataclasses
    from types import SimpleNamespace
    out = str(tmp_path / "run")
    train.main(["--out", out] + MICRO + world_args(tiny_world))
    p1, p2 = [q for q in pairs.read(os.path.join(out, "pairs.jsonl"), 10 ** 6) if q.chosen_ids != q.rejected_ids][:2]
    args = options.get_args(["--out", str(tmp_path / "unused")] + MICRO + world_args(tiny_world))
    ref, tok = load.load_policy(os.path.join(tiny_world, "policy"))
    moved = []
    for batch in ([dataclasses.replace(p1, extra=dict(weight=2.0)), dataclasses.replace(p2, extra=dict(weight=0.0))], [p1]):
        policy = copy.deepcopy(ref)
        train.update(train.start(args, policy), SimpleNamespace(policy=policy, tok=tok), args, batch, 1, ref)
        moved.append(torch.cat([(a - b).flatten() for a, b in zip(policy.parameters(), ref.parameters())]))
    # AdamW's first step is lr * g/|g| per weight: where g is near 0, the rounding of another batch's padding
    # can flip its sign, so the two steps agree to about 1e-4 of their size; a weight ignored or misapplied
    # moves them apart by a large fraction of it
    assert moved[1].abs().max() > 1e-4 and ((moved[0] - moved[1]).norm() / moved[1].norm()).item() < 1e-2

def test_t_pilaf_gives_each_pair_its_prompts_weight(tiny_world, tmp_path):
    """--prompt_weight: each pair's weight is C(x) = 2 + 2*Z+Z-(x) over its batch's mean (Z+- as recorded)."""
    out = str(tmp_path / "run")
    train.main(["--sampler", "t_pilaf", "--n", "4", "--prompt_weight", "--out", out] + MICRO + world_args(tiny_world))
    got = read_jsonl(os.path.join(out, "pairs.jsonl"))
    for i in range(0, 32, 8):                                       # one batch of 8 pairs at a time
        C = [2 + 2 * p["extra"]["z_plus"] * p["extra"]["z_minus"] for p in got[i:i + 8]]
        assert [p["extra"]["weight"] for p in got[i:i + 8]] == pytest.approx([c / (sum(C) / 8) for c in C])
