"""
Loading: every model, tokenizer and data set a run reads by name, the embedded world's folders and
the hub's alike (nothing is special-cased for the embedded world), each checked so that a bad name
costs one line (UserError: exit 2) before anything heavy is read; and load(), which opens a run's
whole set: reference and trained policy, tokenizer, oracle and labeller, prompts.

Loading never runs foreign code: weights are safetensors, every from_pretrained passes
trust_remote_code=False, and a folder that asks for code of its own is refused.
"""
import json
import os
from types import SimpleNamespace

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import ddp
import folder
import pairs
import world
from errors import UserError
from oracle import LABELLERS, Oracle

CODE_FILES = ("config.json", "tokenizer_config.json")   # where a Hugging Face folder can ask to run its own code

def _load(what, name, fn):
    """fn(name), every failure one line. A local folder that asks to run code of its own (`auto_map`)
    is refused before anything is read: loading never runs foreign code, and every from_pretrained
    here passes trust_remote_code=False (left out, transformers asks on stdin, and a piped answer says yes)."""
    for f in CODE_FILES:
        path = os.path.join(name, f)
        if os.path.isfile(path):
            try:
                with open(path) as fh:
                    asks = "auto_map" in json.load(fh)
            except (OSError, ValueError):
                asks = False            # unreadable: from_pretrained below says what is wrong with it
            if asks:
                raise UserError(f"{what} folder '{name}' asks to run code of its own (auto_map in {f}) -- loading "
                                f"never runs a folder's code; use a model of an architecture transformers has built in")
    try:
        return fn(name)
    except Exception as e:  # from_pretrained raises OSError, ValueError, HTTP errors... all mean "can't load"
        where = ("a folder written by save_pretrained / save_to_disk" if os.path.isdir(name)
                 else "a local folder, or download it first (no network here?)")
        raise UserError(f"cannot load {what} '{name}': {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                        f"-- pass {where}") from None

def context_length(config):
    """Positions a model can read (GPT-2 calls it n_positions, most others max_position_embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

DATA_FILES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}   # --prompts as a file

def looks_local(name):
    """Is `name` meant as a file or folder here rather than a hub name ('gpt2', 'org/name')? It says so
    (./, /, ~, a data file's extension, more than one '/'), or it, or its first part, is here."""
    return (name.startswith((".", "/", "~")) or os.path.splitext(name)[1] in DATA_FILES or name.count("/") > 1
            or os.path.exists(name.split("/")[0]))

def check_local(what, name):
    """A model folder named here must exist and hold a config.json: said at once, before any hub is asked."""
    if name and looks_local(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"{what} folder '{name}' " + ("has no config.json -- pass a folder saved with save_pretrained, "
                        "or a hub name" if os.path.isdir(name) else "does not exist -- pass a folder saved with "
                        "save_pretrained, or a hub name"))

def check_name(what, name):
    """Fail early (before any weights are read) when a model folder is missing or unreadable."""
    check_local(what, name)
    cfg = _load(what, name, lambda n: AutoConfig.from_pretrained(n, trust_remote_code=False))
    if getattr(cfg, "auto_map", None):      # a hub model that asks for its own code (nothing of it was run)
        raise UserError(f"{what} '{name}' asks to run code of its own (auto_map in its config) -- loading never runs "
                        f"a model's code; use a model of an architecture transformers has built in")
    return cfg

def eos_ids(model, tok):
    """Every id that ends a response: the tokenizer's EOS and the generation config's, which may be a
    list (Llama-3 instruct models end a turn with <|eot_id|> as well as <|end_of_text|>)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))

def load_policy_tokenizer(name):
    """Left padding for prompts; pad falls back to EOS (harmless: every mask here is explicit)."""
    tok = _load("policy tokenizer", name, lambda n: AutoTokenizer.from_pretrained(n, trust_remote_code=False))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

def load_policy(name, dtype=torch.float32):
    """A causal LM (in eval mode: no dropout anywhere in this repo) and its tokenizer."""
    model = _load("policy", name, lambda n: AutoModelForCausalLM.from_pretrained(n, dtype=dtype, trust_remote_code=False))
    return model.eval(), load_policy_tokenizer(name)

def load_oracle(name, dtype=torch.float32):
    rm = AutoModelForSequenceClassification
    model = _load("oracle", name, lambda n: rm.from_pretrained(n, dtype=dtype, trust_remote_code=False))
    tok = _load("oracle tokenizer", name, lambda n: AutoTokenizer.from_pretrained(n, trust_remote_code=False))
    tok.padding_side = "right"
    if tok.pad_token is None:   # a distinct pad id, so the classifier finds each row's last real token
        tok.add_special_tokens({"pad_token": "<|pad|>"})
        model.resize_token_embeddings(len(tok))
    if model.config.num_labels != 1:
        raise UserError(f"oracle '{name}' has {model.config.num_labels} output labels -- a reward model gives one "
                        f"score (num_labels=1); a classifier's class scores are not rewards")
    model.config.pad_token_id = tok.pad_token_id
    tok.truncation_side = "left"   # a text too long for the oracle loses the prompt's start, not the response
    n_ctx = context_length(model.config)
    if n_ctx:   # many tokenizers leave model_max_length unset (1e30): cut texts at the model's context
        tok.model_max_length = min(tok.model_max_length, n_ctx)
    return model.eval(), tok

def check_vocab(policy_tok, ref_tok):
    """pi± mix the two models' logits token by token, so the vocabularies must be the same."""
    if policy_tok.get_vocab() != ref_tok.get_vocab():
        raise UserError("policy and reference tokenizers differ -- PILAF mixes their logits token by token, "
                        "so start the policy from a checkpoint of the reference model (same vocabulary)")

HH_SEP = "\n\nAssistant:"

def _hh_prompt(text):
    """Anthropic HH-RLHF stores whole dialogues; the prompt is everything up to the last assistant turn."""
    if HH_SEP not in text:
        raise UserError(f"--prompt_format hh: a text has no {HH_SEP!r} turn -- use --prompt_format raw for plain prompts")
    return text[: text.rfind(HH_SEP) + len(HH_SEP)]

def _imdb_prompt(text, n_words=8):
    """IMDb reviews become prompts by keeping their first words (the classic sentiment task)."""
    return " ".join(text.replace("<br />", " ").split()[:n_words])

FORMATS = {"raw": lambda t: t, "hh": _hh_prompt, "imdb": _imdb_prompt}

def load_prompts(name, column="prompt", fmt="raw", train_split="train", test_split="test"):
    """(train prompts, test prompts) as lists of strings, from a saved DatasetDict folder, a hub name, or
    one data file (.jsonl, .json, .csv, .parquet), of which a fixed fifth of the rows is held out."""
    import datasets
    if fmt not in FORMATS:
        raise UserError(f"unknown prompt format '{fmt}' -- use one of {', '.join(FORMATS)}")
    check_prompts(name)
    kind = DATA_FILES.get(os.path.splitext(name)[1])
    if kind:
        def loader(n):   # one split; the held-out fifth is drawn with a fixed seed, so every run holds out the same rows
            ds = datasets.load_dataset(kind, data_files=n)["train"].train_test_split(test_size=0.2, seed=0)
            return datasets.DatasetDict({train_split: ds["train"], test_split: ds["test"]})
    else:
        loader = datasets.load_from_disk if os.path.isdir(name) else datasets.load_dataset
    ds = _load("prompt data set", name, loader)
    if not isinstance(ds, datasets.DatasetDict) or train_split not in ds or test_split not in ds:
        splits = list(ds) if isinstance(ds, datasets.DatasetDict) else "none"
        raise UserError(f"prompt data set '{name}' needs '{train_split}' and '{test_split}' splits (it has: {splits}) "
                        f"-- save a DatasetDict with both, or pick them with --train_split/--test_split")
    out = []
    for split in (train_split, test_split):
        if column not in ds[split].column_names:
            raise UserError(f"prompt data set '{name}' has no column '{column}' in split '{split}' "
                            f"(columns: {', '.join(ds[split].column_names)}) -- pass --prompt_column")
        texts = ds[split][column]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError(f"split '{split}' of '{name}' must hold a non-empty column of strings in '{column}' "
                            f"-- pick a text column with --prompt_column")
        out.append([FORMATS[fmt](t) for t in texts])
    return out

def check_prompts(name):
    """A data set named as a file or folder here must exist: said at once, before any hub is asked."""
    if name and looks_local(name) and not os.path.exists(name):
        raise UserError(f"prompt data set '{name}' does not exist -- pass a saved DatasetDict folder, a .jsonl, .json, "
                        f".csv or .parquet file, or a hub name")

# -----------------------------------------------------------------------------
# a run's whole set

def check_names(args):
    """Every model and data set the user named, checked before the embedded world is built (4 minutes
    on a fresh machine) or any weights load. Returns the named prompts, or None for the world's."""
    for what, name in (("policy", args.policy), ("oracle", getattr(args, scorer(args))), ("--init_from checkpoint", args.init_from)):
        if name:
            check_name(what, name)
    if args.prompts:
        return load_prompts(args.prompts, args.prompt_column, args.prompt_format, args.train_split, args.test_split)
    if args.prompt_column != world.PROMPT_COLUMN:
        raise UserError(f"the embedded world's prompts have no column '{args.prompt_column}' -- "
                        f"leave out --prompt_column (it is '{world.PROMPT_COLUMN}'), or pass --prompts")
    return None

def scorer(args):
    """The option naming the reward model that scores: --oracle, or with a labeller of oracle.LABELLERS
    (--oracle human) --judge."""
    return "judge" if args.oracle in LABELLERS else "oracle"

def load(args, start_from=None):
    """Reference policy, trained policy (from `start_from`, --init_from or the reference), tokenizer,
    oracle (the reward model that scores: --oracle, or --judge), labeller (that oracle, or a person),
    prompts, the ids that end a response, and --from_pairs' pairs. Options naming the embedded world's
    parts are set to its folders. A bad name raises UserError (one line, exit 2)."""
    transformers.logging.disable_progress_bar()   # our own bar is enough
    prompts = check_names(args)
    rm = scorer(args)
    if None in (args.policy, getattr(args, rm), args.prompts):
        if args.policy:   # a hub policy with the toy world's oracle and prompts is rarely what was meant
            missing = [k for k in (rm, "prompts") if getattr(args, k) is None]
            print(f"note: --policy given without --{' or --'.join(missing)}: using the embedded world's "
                  f"{' and '.join(missing)} (from {args.world})")
        wdir = world.ensure(args.world)
        args.policy = args.policy or os.path.join(wdir, "policy")
        setattr(args, rm, getattr(args, rm) or os.path.join(wdir, "oracle"))
        args.prompts = args.prompts or os.path.join(wdir, "prompts")
    cfg = check_name("policy", args.policy)
    train_prompts, test_prompts = prompts or load_prompts(args.prompts, args.prompt_column, args.prompt_format,
                                                          args.train_split, args.test_split)
    tok = load_policy_tokenizer(args.policy)
    source = pairs.read(args.from_pairs, cfg.vocab_size, args.labels) if args.from_pairs else None
    if source is not None:
        check_tokens(source, tok, args.from_pairs)
        beta_note(args)
    train_prompts, test_prompts = fit_context(args, tok, cfg, *without_empty(train_prompts, test_prompts))
    if args.eval_prompts > len(test_prompts) and args.eval_prompts != EVAL_PROMPTS:
        print(f"note: --eval_prompts {args.eval_prompts} is more than the {len(test_prompts)} held-out prompts: "
              f"evaluating on all {len(test_prompts)}")
    dtype = getattr(torch, args.dtype)
    ref, _ = load_policy(args.policy, dtype)
    # the trained weights stay float32 (bf16 would round most AdamW steps away); bf16 = autocast in the stages
    policy, pol_tok = load_policy(start_from or args.init_from or args.policy)
    check_vocab(pol_tok, tok)
    orm, orm_tok = load_oracle(getattr(args, rm), dtype)
    if args.oracle_format == "chat" and not getattr(orm_tok, "chat_template", None):
        raise UserError(f"--oracle_format chat: the tokenizer of '{getattr(args, rm)}' has no chat template "
                        f"-- use --oracle_format plain (or auto)")
    # --fsdp: each model sharded across the ranks (ddp.shard); otherwise each whole on this device
    oracle = Oracle(ddp.shard(orm.to(args.device)), orm_tok, fmt=args.oracle_format, how=args.label)   # or the judge
    if args.activation_checkpointing:       # before sharding: FSDP's gathers then wrap the recomputation
        n = len(ddp.blocks(policy))
        if not n:
            raise UserError(f"--activation_checkpointing: '{args.policy}' names no transformer blocks (_no_split_modules) "
                            f"-- run without it")
        ddp.recompute(policy)
        if ddp.rank == 0:
            print(f"activation checkpointing: {n} blocks of the policy recomputed in backward")
    policy = ddp.shard(policy.to(args.device), bf16=args.dtype == "bfloat16")
    if ddp.fsdp and ddp.rank == 0:
        n, size = ddp.on_this_rank(policy)
        print(f"policy: {n / 1e6:.2f} M parameters, {size / 2 ** 20:.2f} MiB on this rank (--fsdp over {ddp.nproc})")
    return SimpleNamespace(ref=ddp.shard(ref.to(args.device).requires_grad_(False)),
                           policy=policy,   # stays in eval mode: no dropout, so policy == ref gives loss log 2
                           tok=tok, eos=eos_ids(ref, tok), oracle=oracle,
                           # --from_pairs: its pairs, and a hash of the lines this run trains on (a resume checks it)
                           source=source, source_path=args.from_pairs,
                           source_sha256=source and folder.lines_hash(args.from_pairs, args.labels),
                           # the labeller: the oracle, or one of oracle.LABELLERS (a person at this terminal) with it as judge
                           labeller=LABELLERS[args.oracle](oracle, args) if args.oracle in LABELLERS else oracle,
                           train_prompts=train_prompts, test_prompts=test_prompts[:args.eval_prompts])

def check_tokens(source, tok, path):
    """--from_pairs' pairs must be this tokenizer's: each prompt's ids are its own tokens, each response's
    ids decode to the stored text (another tokenizer of the same vocabulary size passes the range check
    in pairs.read, not this one)."""
    for n, p in enumerate(source, 1):
        if (tok(p.prompt)["input_ids"] != p.prompt_ids or tok.decode(p.chosen_ids, skip_special_tokens=True) != p.chosen
                or tok.decode(p.rejected_ids, skip_special_tokens=True) != p.rejected):
            raise UserError(f"{path} line {n}: its token ids are not the policy tokenizer's tokens of its texts -- these "
                            f"pairs were made with another tokenizer; pass the --policy they came from")

def beta_note(args):
    """--from_pairs with another beta: its J (reward - beta*KL) is not the source run's J; say so."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(args.from_pairs)), "config.json")
    try:
        with open(cfg) as f:
            beta = json.load(f).get("beta")
    except (OSError, ValueError):
        return
    if beta is not None and beta != args.beta:
        print(f"note: J here is reward - {args.beta}*KL; the run these pairs come from measured its J with beta {beta}, "
              f"so the two J's are not comparable (reward and KL are)")

EVAL_PROMPTS = 64   # --eval_prompts's default (options.py): more than a split holds is noted only when asked for

def without_empty(train_prompts, test_prompts):
    """Leave out empty prompts (a response to nothing teaches nothing), and say so."""
    kept = [[p for p in ps if p.strip()] for ps in (train_prompts, test_prompts)]
    for name, ps, k in zip(("training", "held-out"), (train_prompts, test_prompts), kept):
        if not k:
            raise UserError(f"every {name} prompt is empty -- pick the column that holds them with --prompt_column")
        if len(k) < len(ps):
            print(f"note: leaving out {len(ps) - len(k)} empty {name} prompts")
    return kept

def fit_context(args, tok, cfg, train_prompts, test_prompts):
    """Leave out prompts too long to leave room for a full response in the policy's context."""
    n_ctx = context_length(cfg) or 10**9
    lens = [list(map(len, tok(ps)["input_ids"])) for ps in (train_prompts, test_prompts)]
    room = n_ctx - args.max_new_tokens
    shortest = max(min(ls) for ls in lens)      # each split needs one prompt that fits
    if shortest >= n_ctx:
        raise UserError(f"every prompt of a split is as long as the policy's context ({n_ctx} tokens) or longer, "
                        f"leaving no room for a response -- pass shorter prompts (or --prompt_format to cut them)")
    if shortest > room:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompts in the policy's "
                        f"context ({n_ctx} tokens) -- lower --max_new_tokens to {n_ctx - shortest} or less")
    dropped = sum(n > room for ls in lens for n in ls)
    if dropped:   # long dialogues (HH-RLHF) would overflow GPT-2's positions: leave them out, and say so
        print(f"note: leaving out {dropped} prompts longer than {room} tokens (the context minus --max_new_tokens)")
    return ([p for p, n in zip(ps, ls) if n <= room] for ps, ls in zip((train_prompts, test_prompts), lens))
