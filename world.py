"""
The embedded world the algorithm runs in by default: a tokenizer, a reference policy, an oracle
reward model and prompts, built offline from a seed (`build`, a tiny help-desk task) and cached
(`ensure`). It is saved as ordinary Hugging Face folders and a DatasetDict, so load.py opens it
exactly as it opens any model or data set named on the command line.

The embedded task. A customer writes in with a problem; the agent replies in a few short sentences:

    customer : my kettle is missing . agent :  sorry about that . we will find the missing kettle .
                                               your kettle matters to us . have a nice day .

The hidden ground truth (`true_reward`) is what a careful human rater would score:
    +2   offers the fix that matches the problem (broken → replace, wrong size → exchange,
         missing → find, stopped working → repair, charged twice → refund)
    -1   for each fix that does not match the problem
    +1   apologises               -2  is rude ("that is not our problem .")
    +0.5 mentions the customer's item  (-0.5 for mentioning some other item)
    +0.5 closes politely
    -0.5 for each garbled sentence, -0.3 for each sentence beyond four, -1 if cut off mid-sentence
The best reply scores 4.0. The reference policy imitates agents who pick sentences at random
(the right fix one time in five, now and then rude), so it scores far less: there is a real
reward/KL trade-off and room for the samplers to differ. The oracle is a small neural reward model
trained from this ground truth, with a tokenizer of its own, reached only through text — exactly
like a hub reward model, including its mistakes.
"""
import omp  # noqa: F401  (first: how the CPU threads wait, set before torch loads; omp.py says why)

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from errors import UserError

# -----------------------------------------------------------------------------
# settings of the embedded world; changing any of them (or the version of torch, transformers or
# tokenizers) rebuilds it: the cache key is their hash
WORLD = dict(
    version=3,          # bump when the task or the training code changes (3: built on one thread)
    seed=0,             # one seed for everything the build draws
    test_frac=0.2,      # share of the prompts held out for evaluation
    sft_examples=20000, # (prompt, reply) pairs the reference policy imitates
    sft_epochs=2,       # passes over them
    rm_examples=20000,  # scored replies the oracle reward model learns from
    rm_epochs=6,        # passes over them (matching fix to problem is learnt late: fewer and it never is)
    n_layer=2, n_head=4, n_embd=64,  # the policy: a GPT-2 this small runs a full DPO job in minutes
    rm_layer=2, rm_embd=64,          # the oracle: a GPT-2 sequence classifier of the same size
    rm_vocab=400,       # the oracle's own byte-level BPE vocabulary
    batch_size=64, lr=3e-3,
)
PROMPT_COLUMN = "prompt"   # the embedded world's prompt column (build() also saves "item" and "problem")
DEFAULT_DIR = os.path.join(os.environ.get("PILAF_CACHE", os.path.expanduser("~/.cache/pilaf")), "world")


# -----------------------------------------------------------------------------
# the task: prompts, the reference's reply distribution, the hidden ground truth

ITEMS = ["lamp", "kettle", "jacket", "phone", "chair", "blender", "backpack", "watch", "printer", "bike"]
PROBLEMS = {  # problem -> (how the customer says it, the fix that solves it; they share a key word)
    "broken":  ("my {item} arrived broken", "we will replace the broken {item} ."),
    "size":    ("my {item} is the wrong size", "we will exchange it for the right size ."),
    "missing": ("my {item} is missing", "we will find the missing {item} ."),
    "dead":    ("my {item} stopped working", "we will repair it so it is working again ."),
    "charged": ("i was charged twice for my {item}", "we will refund you for paying twice ."),
}
TEMPLATES = ["customer : {p} . agent :", "customer : hello , {p} . what now ? agent :", "customer : {p} ! agent :"]
APOLOGY = ["sorry about that .", "we are very sorry ."]
RUDE = ["that is not our problem ."]
CLOSING = ["have a nice day .", "thank you for your patience ."]
NEUTRAL = ["hello .", "let me check .", "please wait ."]
MENTION = "your {item} matters to us ."

def all_prompts():
    return [(t.format(p=say.format(item=item)), item, prob)
            for item in ITEMS for prob, (say, _) in PROBLEMS.items() for t in TEMPLATES]

def parse_prompt(prompt):
    """(item, problem) of a prompt of this task, or (None, None)."""
    for item in ITEMS:
        for prob, (say, _) in PROBLEMS.items():
            if say.format(item=item) in prompt:
                return item, prob
    return None, None

def sentences(item):
    """Every sentence an agent of this task may say, about `item` where it names one."""
    fixes = [fix.format(item=item) for _, fix in PROBLEMS.values()]
    return APOLOGY + RUDE + CLOSING + NEUTRAL + fixes + [MENTION.format(item=i) for i in ITEMS]

def true_reward(prompt, response):
    """The hidden ground truth (see the module docstring). Only the oracle is trained on it."""
    item, prob = parse_prompt(prompt)
    chunks = response.split(".")
    cut = bool(chunks.pop().strip())   # words after the last full stop: ran out of tokens mid-sentence
    parts = [c.strip() + " ." for c in chunks]
    said = set(parts)
    right = PROBLEMS[prob][1].format(item=item) if prob else None
    fixes = {fix.format(item=item) for _, fix in PROBLEMS.values()}
    mentions = {MENTION.format(item=i) for i in ITEMS}
    known = set(sentences(item))
    r = 2.0 * (right in said) - 1.0 * len((said & fixes) - {right})
    r += 1.0 * bool(said & set(APOLOGY)) - 2.0 * bool(said & set(RUDE))
    r += 0.5 * (MENTION.format(item=item) in said) - 0.5 * bool(said & (mentions - {MENTION.format(item=item)}))
    r += 0.5 * bool(said & set(CLOSING))
    r -= 0.5 * sum(s not in known for s in parts) + 0.3 * max(0, len(parts) - 4) + 1.0 * cut
    return r

def reference_reply(item, problem, rng, skill=0.0):
    """A reply as the imitated agents write it. skill=0: the reference's own distribution;
    skill>0 tilts the choice toward good sentences and the right fix (only to show the oracle good replies)."""
    n = rng.choice([1, 2, 2, 3, 3, 4, 5])
    kinds = ["apology", "rude", "fix", "neutral", "mention", "closing"]
    w = [0.22 + skill, 0.08 * (1 - skill), 0.3, 0.15 * (1 - skill), 0.1 + skill / 2, 0.15 + skill / 2]
    out = []
    for kind in rng.choices(kinds, weights=w, k=n):
        if kind == "fix":
            fix = PROBLEMS[problem][1] if rng.random() < skill else rng.choice([f for _, f in PROBLEMS.values()])
            out.append(fix.format(item=item))
        elif kind == "mention":
            out.append(MENTION.format(item=item if rng.random() < 0.5 + skill / 2 else rng.choice(ITEMS)))
        else:
            out.append(rng.choice(dict(apology=APOLOGY, rude=RUDE, neutral=NEUTRAL, closing=CLOSING)[kind]))
    return " ".join(out)

def corrupt(reply, rng, words):
    """Replies off the reference's path (the policy will wander there): drop, swap, repeat, cut."""
    w = reply.split()
    op = rng.randrange(5)
    if op == 0 and len(w) > 1:
        del w[rng.randrange(len(w))]
    elif op == 1:
        w.insert(rng.randrange(len(w) + 1), rng.choice(words))
    elif op == 2:
        s = reply.split(" . ")
        w = " . ".join(s + [rng.choice(s)]).split()
    elif op == 3:
        w = w[: rng.randrange(1, len(w) + 1)]
    else:
        s = [x for x in reply.split(" .") if x.strip()]
        rng.shuffle(s)
        w = (" .".join(s) + " .").split()
    return " ".join(w)

# -----------------------------------------------------------------------------
# building: tokenizers, the reference policy (SFT), the oracle (reward regression), prompts

def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<pad>", "<unk>"] + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")

def _bpe_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="right")

def _batches(n, bs, rng):
    idx = list(range(n))
    rng.shuffle(idx)
    return [idx[i:i + bs] for i in range(0, n, bs)]

def _train(model, steps_fn, n, cfg, rng, desc):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    batches = [b for _ in range(cfg["epochs"]) for b in _batches(n, cfg["batch_size"], rng)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / len(batches))
    model.train()
    for b in (bar := tqdm(batches, desc=desc, leave=False)):
        loss = steps_fn(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()

def build(out_dir, cfg=WORLD):
    """Build the embedded world into out_dir: the same world from the same cfg on any machine, whatever
    its number of cores (a few minutes on a CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # the sums of a matrix product are split by thread: one thread, one rounding everywhere
    try:
        _build(out_dir, cfg)
    finally:
        torch.set_num_threads(threads)

def _build(out_dir, cfg):
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    prompts = all_prompts()
    rng.shuffle(prompts)
    n_test = int(len(prompts) * cfg["test_frac"])
    test, train = prompts[:n_test], prompts[n_test:]

    # the policy's tokenizer: one token per word of the task
    words = {w for p, _, _ in prompts for w in p.split()}
    words |= {w for item in ITEMS for s in sentences(item) for w in s.split()}
    tok = _word_tokenizer(words)

    # the reference policy: a small GPT-2 fit to the imitated agents' replies (loss on replies only)
    sft = [(p, reference_reply(item, prob, rng)) for p, item, prob in (rng.choice(train) for _ in range(cfg["sft_examples"]))]
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                                        n_embd=cfg["n_embd"], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    policy.loss_type = "ForCausalLM"   # the loss transformers uses anyway; named, so that it does not warn about it
    p_ids = [tok(p)["input_ids"] for p, _ in sft]
    r_ids = [tok(r)["input_ids"] + [tok.eos_token_id] for _, r in sft]

    def sft_loss(b):
        seqs = [p_ids[i] + r_ids[i] for i in b]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])
        labels = torch.tensor([[-100] * len(p_ids[i]) + r_ids[i] + [-100] * (T - len(p_ids[i]) - len(r_ids[i])) for i in b])
        return policy(input_ids=ids, attention_mask=ids != tok.pad_token_id, labels=labels).loss

    _train(policy, sft_loss, len(sft), dict(cfg, epochs=cfg["sft_epochs"]), rng, "world: reference policy")

    # the oracle: a sequence classifier regressing the hidden reward, on replies from the reference,
    # from better agents, and corrupted ones, so it still scores sensibly where DPO takes the policy.
    # Half the replies are shown under another complaint about the same item: the same words then
    # score differently, which is what teaches a small model to match the fix to the problem.
    # Like a hub reward model (or a human), it knows every kind of complaint, held-out prompts too;
    # only the policy's training is restricted to the train split.
    vocab = sorted(words)
    rm_data = []
    for _ in range(cfg["rm_examples"]):
        p, item, prob = rng.choice(prompts)
        r = reference_reply(item, prob, rng, skill=rng.choice([0.0, 0.0, 0.25, 0.5, 0.75, 1.0]))
        if rng.random() < 0.5:
            p = rng.choice([q for q, i, _ in prompts if i == item])
        if rng.random() < 0.3:
            r = corrupt(r, rng, vocab)
        rm_data.append((p, r, true_reward(p, r)))
    rm_tok = _bpe_tokenizer([p + " " + r for p, r, _ in rm_data[:5000]], cfg["rm_vocab"])
    rm_tok.model_max_length = 128   # long corrupted replies are cut, as a hub RM cuts at its context
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(rm_tok), n_positions=rm_tok.model_max_length, n_layer=cfg["rm_layer"],
                                                  n_head=cfg["n_head"], n_embd=cfg["rm_embd"], num_labels=1,
                                                  pad_token_id=rm_tok.pad_token_id, bos_token_id=rm_tok.eos_token_id,
                                                  eos_token_id=rm_tok.eos_token_id))
    enc = rm_tok([p + " " + r for p, r, _ in rm_data], truncation=True)["input_ids"]
    y = torch.tensor([s for _, _, s in rm_data])

    def rm_loss(b):
        x = rm_tok.pad({"input_ids": [enc[i] for i in b]}, return_tensors="pt")
        return F.mse_loss(rm(**x).logits.squeeze(-1), y[b])

    _train(rm, rm_loss, len(rm_data), dict(cfg, epochs=cfg["rm_epochs"]), rng, "world: oracle reward model")

    import datasets
    from datasets import Dataset, DatasetDict
    datasets.disable_progress_bars()          # the build has its own bars
    cols = lambda rows: {PROMPT_COLUMN: [p for p, _, _ in rows], "item": [i for _, i, _ in rows], "problem": [q for _, _, q in rows]}
    os.makedirs(out_dir, exist_ok=True)
    policy.save_pretrained(os.path.join(out_dir, "policy"))
    tok.save_pretrained(os.path.join(out_dir, "policy"))
    rm.save_pretrained(os.path.join(out_dir, "oracle"))
    rm_tok.save_pretrained(os.path.join(out_dir, "oracle"))
    DatasetDict(train=Dataset.from_dict(cols(train)), test=Dataset.from_dict(cols(test))).save_to_disk(os.path.join(out_dir, "prompts"))
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(dict(settings=cfg, versions=versions(), key=world_key(cfg)), f, indent=1)

def versions():
    """The libraries whose numbers the build depends on: another version trains another world."""
    return dict(torch=torch.__version__, transformers=transformers.__version__, tokenizers=tokenizers.__version__)

def world_key(cfg=WORLD):
    return hashlib.sha256(json.dumps(dict(cfg, versions=versions()), sort_keys=True).encode()).hexdigest()[:12]

PARTS = ("world.json", "policy", "oracle", "prompts")   # what a built world holds
READY = ("world.json", "policy/config.json", "oracle/config.json", "prompts/dataset_dict.json")

def ensure(out_dir=DEFAULT_DIR, cfg=WORLD):
    """The embedded world's folder, built first if missing, built from other settings, or damaged (a
    part deleted). One process builds at a time (a lock beside the folder): a second one, a compare.py
    child say, waits for it and then finds the world built. A folder that holds anything else is never
    replaced."""
    meta = os.path.join(out_dir, "world.json")
    if _built(out_dir, cfg):
        return out_dir
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or set(os.listdir(out_dir)) - set(PARTS)):
        raise UserError(f"--world {out_dir} is {'a file' if not os.path.isdir(out_dir) else 'a folder that holds no world'} "
                        f"-- pass an empty or new folder (or set PILAF_CACHE to one)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        lock = open(os.path.join(parent, "." + os.path.basename(out_dir) + ".lock"), "w")
    except OSError as e:
        raise UserError(f"cannot make the world's cache {out_dir} ({e.strerror}) -- set PILAF_CACHE (or --world) to a "
                        f"folder you can write") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                    # freed by the kernel if this process dies
        if _built(out_dir, cfg):                            # another process built it while this one waited
            return out_dir
        aside = f".{os.path.basename(out_dir)}-build-"
        for old in os.listdir(parent):      # builds of this world killed part-way (they held this lock): never finished
            if old.startswith(aside) and os.path.isdir(os.path.join(parent, old)):
                shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
        print(f"building the embedded world in {out_dir} (once; cached afterwards)" +
              (" -- the cached one was built from other settings or is missing a part" if os.path.exists(meta) else ""))
        tmp = tempfile.mkdtemp(dir=parent, prefix=aside)       # built aside, then swapped in whole:
        os.chmod(tmp, 0o755)                                    # an interrupted build leaves no half world
        try:
            build(tmp, cfg)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    return out_dir

def _built(out_dir, cfg):
    """Is the world in out_dir whole, and built from cfg (and these library versions)?"""
    if not all(os.path.exists(os.path.join(out_dir, f)) for f in READY):
        return False
    try:
        with open(os.path.join(out_dir, "world.json")) as f:
            return json.load(f).get("key") == world_key(cfg)
    except (OSError, ValueError, AttributeError):
        return False
