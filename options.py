"""
train.py's command line and its checks: every option with its default and a line of help, and the
checks that turn bad input into one line naming the fix (exit 2, like argparse) before the world is
built, any weights load or anything is written. compare.py reads the same parser.

A sampler's own options (best_of_n's --n) sit in the "sampler options" group: a sampler takes them
as keyword parameters of the same names (pilaf.OPTIONS says whose), train.py passes each sampler its
own, and one typed for a sampler that cannot use it is refused.
"""
import argparse
import json
import math
import os

import torch

import ddp
import load
import pilaf
import world
from dpo import LOSSES
from errors import UserError, die
from oracle import LABELLERS

SAMPLER_OPTIONS = "sampler options (each for the samplers that take it)"
# Below this, sampling is greedy in all but name: a token 1 nat less likely than the best one is drawn
# e^-10 times as often at 0.1, so the two responses of a pair are nearly always the same.
MIN_TEMPERATURE = 0.1

def sampler_options():
    """Every sampler's own options (pilaf.OPTIONS): each sampler takes those it names."""
    return sorted({k for opts in pilaf.OPTIONS.values() for k in opts})

class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default once: not where the help already names it, nor a default of None."""
    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

def parser():
    p = argparse.ArgumentParser(description="Online / iterative DPO with PILAF and baseline pair samplers.",
                                formatter_class=Help)
    p.error = die   # one line instead of usage + error
    g = p.add_argument_group("algorithm")
    g.add_argument("--sampler", default="pilaf", choices=list(pilaf.SAMPLERS), help="how pairs are drawn (pilaf.py)")
    g.add_argument("--mode", default="online", choices=["online", "iterative"], help="fresh pairs every step, or K collect-then-train rounds")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta; also PILAF's interpolation weight and the KL weight in J")
    g.add_argument("--xpo_alpha", type=float, default=0.0, help="hybrid: XPO exploration term alpha*log pi(y_ref) added to the loss (0 = plain DPO)")
    g.add_argument("--loss", default="dpo", choices=LOSSES, help="dpo: -log sigmoid(beta*D); ipo: (D - 1/(2 beta))^2; hinge: max(0, 1 - beta*D), D the log-ratio margin")
    g.add_argument("--reference", default="initial", choices=["initial", "behavior"], help="what the loss anchors to: the initial model, or (BPO) the policy that sampled the round's pairs; KL and J always use the initial model")
    g.add_argument("--label", default="bt", choices=["bt", "argmax"], help="oracle labels: Bradley-Terry draw, or always the higher score")
    g = p.add_argument_group(SAMPLER_OPTIONS)
    g.add_argument("--n", type=int, default=8, help="best_of_n, t_pilaf: candidates per prompt")
    g.add_argument("--prompt_weight", action="store_true", help="t_pilaf: weight each pair's loss by C(x) = 2 + 2*Z+Z-(x) "
                   "over its batch's mean, so the expected update follows grad J (pilaf.t_pilaf)")
    g = p.add_argument_group("budget")
    g.add_argument("--labels", type=int, default=4096, help="preference labels in total (the annotation budget)")
    g.add_argument("--batch_size", type=int, default=32, help="pairs per DPO step (online: also per round)")
    g.add_argument("--iterations", type=int, default=4, help="iterative: collect-then-train rounds")
    g.add_argument("--epochs", type=int, default=2, help="iterative: passes over each round's pairs")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    g.add_argument("--max_new_tokens", type=int, default=32, help="longest response")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the training pairs, 0.1 or more (evaluation samples at 1)")
    g = p.add_argument_group("models and data (unless named: the embedded world, built offline on first use)")
    g.add_argument("--world", default=world.DEFAULT_DIR, help="where the embedded world is cached")
    g.add_argument("--policy", default=None, help="reference / initial policy: causal LM name or folder")
    g.add_argument("--init_from", default=None, help="start the policy from this checkpoint instead (reference stays --policy)")
    g.add_argument("--oracle", default=None, help="reward model (sequence classifier) name or folder; or a labeller of oracle.LABELLERS: "
                   "'human', you label the pairs in this terminal")
    g.add_argument("--judge", default=None, help="with --oracle human (a labeller that is not a reward model): the reward model that "
                   "scores the evaluations and your agreement with it (default: the embedded world's oracle)")
    g.add_argument("--oracle_format", default="auto", choices=["auto", "chat", "plain"], help="what the oracle reads: its chat template applied to [user: prompt, assistant: response], or prompt + ' ' + response; auto = chat when its tokenizer has a template")
    g.add_argument("--prompts", default=None, help="prompt data set: name or a saved DatasetDict folder")
    g.add_argument("--prompt_column", default="prompt", help="column holding the prompt text")
    g.add_argument("--prompt_format", default="raw", choices=list(load.FORMATS), help="hh: cut HH-RLHF dialogues at the last assistant turn; imdb: first words of a review")
    g.add_argument("--train_split", default="train", help="split the training prompts come from")
    g.add_argument("--test_split", default="test", help="held-out split for evaluation")
    g.add_argument("--from_pairs", default=None, help="train on the labelled pairs of this pairs.jsonl, in their order, instead of sampling and labelling new ones")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval_every", type=int, default=512, help="evaluate after every this many labels (and at start and end)")
    g.add_argument("--eval_prompts", type=int, default=load.EVAL_PROMPTS, help="held-out prompts per evaluation (at most the split's size)")
    g.add_argument("--eval_samples", type=int, default=8, help="policy samples per held-out prompt")
    g.add_argument("--save_every", type=int, default=512, help="checkpoint after every this many labels (and at start and end)")
    g.add_argument("--keep_checkpoints", action="store_true", help="keep every checkpoint, not only the latest: the policy "
                   "along the way (each one a folder --init_from can start from)")
    g.add_argument("--out", default=None, help="run folder (default out/<sampler>-<mode>-s<seed>)")
    g.add_argument("--overwrite", action="store_true", help="start again in a folder that holds a run; the old run is "
                   "moved aside to <out>.replaced-N, never deleted (its labels were paid for)")
    g.add_argument("--resume", default=None, metavar="RUN", help="continue the run in this folder from its last checkpoint, with its saved options")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts, sampling, labels and init")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights")
    g.add_argument("--fsdp", action="store_true", help="shard policy, reference and reward model across the processes "
                   "(FSDP2; under torchrun, or one process): for models too big for one device (docs/running.md)")
    g.add_argument("--activation_checkpointing", action="store_true", help="recompute each policy block's activations in "
                   "backward instead of keeping them: less memory per DPO step, one more forward (docs/performance.md)")
    return p

def defaults():
    """Every option, with its default."""
    return {a.dest: a.default for a in parser()._actions if a.dest != "help"}

def typed(argv):
    """The options actually typed in argv (no defaults), as a dict."""
    given = parser()
    for a in given._actions:
        a.default = argparse.SUPPRESS
    return vars(given.parse_args(argv))

def get_args(argv=None):
    """The run's options: parsed and checked, or with --resume RUN the options saved in RUN/config.json
    (checked the same way). What the run folder holds is checked later, under its lock (folder.claim)."""
    args = parser().parse_args(argv)
    if args.resume:
        return resume_args(argv, args.resume)
    check(args)
    given = typed(argv)
    for k in sampler_options():
        if k in given and k not in pilaf.options(args.sampler):
            takers = [s for s in pilaf.SAMPLERS if k in pilaf.options(s)]
            die(f"--{k} is an option of --sampler {' and '.join(takers)}, which --sampler {args.sampler} cannot use "
                f"-- leave it out")
    args.out = args.out or os.path.join("out", f"{args.sampler}-{args.mode}-s{args.seed}")
    try:        # named files and folders that are not there: said now, before anything about the run folder
        for what, name in (("policy", args.policy), ("--init_from checkpoint", args.init_from),
                           ("judge" if args.oracle in LABELLERS else "oracle", args.judge or
                            (None if args.oracle in LABELLERS else args.oracle))):
            load.check_local(what, name)
        load.check_prompts(args.prompts)
    except UserError as e:
        die(str(e))
    if args.oracle in LABELLERS and "labels" not in given:
        print(f"note: --oracle {args.oracle}: you will be asked to label {args.labels} pairs (--labels, the default); "
              f"pass --labels N for another number (and --batch_size N, if N is less than {args.batch_size})")
    if args.from_pairs and inside(args.from_pairs, args.out):
        die(f"--from_pairs {args.from_pairs} is inside --out {args.out}, whose pairs.jsonl the run writes -- "
            f"pass another --out")
    return args

def inside(path, folder):
    """Is `path` in `folder` (or below it)?"""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder

def check(args, fail=die):
    """Every check that needs no file opened; `fail` says what is wrong, in one line."""
    for name in ["labels", "batch_size", "iterations", "epochs", "max_new_tokens", "n", "eval_every", "eval_prompts",
                 "eval_samples", "save_every"]:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ["beta", "lr", "temperature", "xpo_alpha"]:
        if not math.isfinite(getattr(args, name)):
            fail(f"--{name} must be a finite number (got {getattr(args, name)})")
    if not 0 <= args.seed < 2 ** 62:
        fail(f"--seed must be between 0 and 2**62 (got {args.seed})")
    if args.beta <= 0:
        fail(f"--beta must be > 0 (got {args.beta}); the paper uses 0.1")
    if args.lr <= 0 or args.temperature < 0 or args.xpo_alpha < 0:
        fail("--lr must be > 0, --temperature and --xpo_alpha >= 0")
    if args.temperature < MIN_TEMPERATURE:
        fail(f"--temperature {args.temperature} samples (almost) greedily, so both responses of a pair would be the "
             f"same and every label wasted -- use {MIN_TEMPERATURE} or more (the default is 1; evaluation always "
             f"samples at 1)")
    if args.n < 2:
        fail("--n must be at least 2: best_of_n and t_pilaf label two of n candidates")
    if args.sampler == "t_pilaf" and (args.n % 2 or args.n < 4):
        fail(f"--n must be even and at least 4 for t_pilaf (got {args.n}): it draws y+ and y- from two halves of "
             f"the candidates, and estimates Z+- from the others")
    if args.sampler == "t_pilaf" and args.temperature != 1:
        fail(f"--temperature {args.temperature}: t_pilaf's candidates must be samples of the policy itself, at "
             f"temperature 1 -- leave out --temperature")
    if args.mode == "online" and args.labels % args.batch_size:
        fail(f"--labels ({args.labels}) must be a multiple of --batch_size ({args.batch_size}) in online mode")
    if args.mode == "iterative" and args.labels % args.iterations:
        fail(f"--labels ({args.labels}) must be a multiple of --iterations ({args.iterations})")
    if args.device.startswith("cuda") and not torch.cuda.is_available() or args.device.split(":")[0] not in ("cpu", "cuda"):
        fail(f"--device {args.device} is not available here -- use --device cpu")
    if args.xpo_alpha and args.sampler != "hybrid":
        fail("--xpo_alpha applies to --sampler hybrid only")
    procs, per_round = ddp.procs(), args.batch_size if args.mode == "online" else args.labels // args.iterations
    if args.batch_size % procs or per_round % procs:
        fail(f"--batch_size ({args.batch_size}) and the pairs per round ({per_round}) must split evenly across the "
             f"{procs} processes -- pick a --batch_size and --labels that are multiples of {procs}")
    if args.fsdp and args.reference == "behavior":
        fail("--reference behavior copies the policy every round, which --fsdp does not shard -- use --reference "
             "initial with --fsdp")
    if args.from_pairs and args.reference == "behavior":
        fail("--reference behavior anchors to the policy that sampled the pairs, which --from_pairs does not have "
             "-- use --reference initial")
    if args.judge and args.oracle not in LABELLERS:
        fail("--judge scores the evaluations when a person labels (--oracle human); otherwise --oracle does -- leave out --judge")
    labeller = LABELLERS.get(args.oracle)
    if labeller and labeller.terminal and (procs > 1 or args.from_pairs):
        fail(f"--oracle {args.oracle} labels in one terminal: run it with plain python train.py, without --from_pairs")
    if labeller and args.from_pairs:
        fail(f"--from_pairs buys no label -- leave out --oracle {args.oracle}")
    if args.from_pairs and not os.path.isfile(args.from_pairs):
        fail(f"--from_pairs {args.from_pairs}: no such file -- pass the pairs.jsonl of a run")

def resume_args(argv, run):
    """The saved options of the run in folder `run`, read back through the parser and the same checks
    as a typed command line (a hand-edited config.json is caught here); options given again must
    agree with them."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        die(f"--resume {run}: no config.json there -- pass the --out folder of a run")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not an object of options")
    except ValueError as e:
        die(f"{path} is damaged ({e}) -- the run's options cannot be read; start a new run")
    bad = lambda msg: die(f"{path} (the run's saved options): {msg} -- restore the file, or start a new run")
    p = parser()
    p.error = bad
    known = {a.dest: a for a in p._actions if a.dest != "help"}
    unknown = [k for k in saved if k not in known]
    if unknown:
        bad(f"'{unknown[0]}' is not an option of this train.py")
    argv_saved = []
    for k, v in saved.items():
        if v is None or k in ("resume", "out"):
            continue
        a = known[k]
        if isinstance(a, argparse._StoreTrueAction):
            argv_saved += [a.option_strings[0]] if v is True else []
        else:
            argv_saved += [a.option_strings[0], str(v)]
    args = p.parse_args(argv_saved)
    check(args, bad)
    given = typed(argv)
    given.pop("resume")
    for k, v in given.items():
        if saved.get(k) != v and not (k == "out" and os.path.abspath(v) == os.path.abspath(run)):
            die(f"--resume continues with the run's saved options: --{k} {v} contradicts its {k}={saved.get(k)!r} "
                f"-- leave --{k} out, or start a new run (--from_pairs {run}/pairs.jsonl reuses its labels)")
    return argparse.Namespace(**dict(vars(args), out=run, resume=run))
