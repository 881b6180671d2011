"""One line of ``--help`` per run config key: what it sets (its default and choices are added by
``config.add_config_arguments``). Plain text, no markup; a test checks every key has one."""

from __future__ import annotations

CONFIG_HELP: dict[str, str] = {
    # data
    "corpus": "the text: 'embedded' (offline), a text file, a folder of split files, or a hub data set",
    "corpus_config": "the hub data set's config name (e.g. wikitext-2-raw-v1); '' for none",
    "tokenizer": "'bpe:N' (a BPE of N ids trained on the train split), a tokenizer folder, or 'model' "
    "(the pretrained model's own)",
    "seq_len": "tokens per window",
    "batch_size": "windows per batch",
    "eval_stride": "tokens between evaluation windows (0 = half a window: each scored token has half a window "
    "of context)",
    "eval_split": "the split the sweep scores",
    "eval_batches": "score the first N batches of the scored split (0 = all): the cheapest way to a quick run",
    "validation_batches": "calibrate thresholds, risk-control and early-stop exit rules on the first N "
    "validation batches (0 = all)",
    # model
    "preset": "the stages' architecture when the cascade is trained here",
    "model": "early exit inside a pretrained causal LM instead: a local folder, a hub name, gguf:FILE or "
    "pypi:DISTRIBUTION ('' = train the preset cascade)",
    "boundaries": "with model: cut before these layer indices (e.g. 4 8 on 12 layers gives 4/4/4)",
    "block_heads": "with model: how non-last blocks exit: the model's own norm + head, heads trained here, or "
    "the exit study's translators",
    "exit_layers": "with model: the exit study's candidate layers (every layer through the shared head, a "
    "translator fitted at each candidate); each costs one fit",
    "auto_boundaries": "with model: instead of boundaries, cut at the first candidate whose translator agrees "
    "with full depth on this share of validation tokens",
    "translator_fit": "how the exit study fits translators: ridge least squares (seconds), or that then "
    "trained by KL to the full model's top-k (lstsq+kl: up to 360 s, train-exits' recipe)",
    # training
    "protocol": "the training protocol of the cascade trained here",
    "layers": "layers per stage ('' = the protocol's)",
    "layer_weights": "joint training's loss weight per stage ('' = the protocol's)",
    "training_hard_ratios": "share of tokens later stages train on, one or one per boundary ('' = the protocol's)",
    "lr_decay": "stage k trains at stage 0's learning rate x lr_decay^k (0 = the protocol's)",
    "exit_head": "a later stage's exit head: a copy of the earlier one or frozen ('' = the protocol's)",
    "hard_examples": "what later stages train on: hard tokens or whole hard sequences ('' = the protocol's)",
    "leaky_seed_protocol": "the seeds' leaky protocol: hard tokens collected from validation and scored there "
    "(for reproducing their figures only)",
    "patience": "early-stopping patience per stage ('' = the protocol's)",
    "dense_patience": "the dense baseline's early-stopping patience (0 = stage 0's)",
    "max_epochs": "safety cap on epochs per trained part (a part that reaches it is flagged)",
    "max_steps_per_epoch": "cap on steps per epoch (0 = whole epochs; capped epochs are flagged)",
    # sweep
    "hard_ratios": "the sweep's hard ratios: the share of tokens that continue past stage 0, one point each",
    "baselines": "the reference points to measure beside the sweep",
    "oracle_tolerance": "the oracle exits a token once its NLL is within this many nats of the last stage's",
    "batching": "how the tokens continuing to a stage are batched: padded rows, or buckets of similar length",
    "kv_policies": "K/V policies for exited tokens, one point each at the anchor hard ratio (none given: none)",
    # exit rules
    "exit_rule": "the rule the cascade trains and is swept with ('' = the protocol's)",
    "exit_rules": "every rule swept on the trained cascade (lowrank:R needs R <= the hidden size; topk:K needs "
    "K <= the vocabulary)",
    "classifier_target": "what a learned exit classifier predicts",
    "exit_train_tokens": "train tokens for translators and exit classifiers (0 = the whole train split)",
    # risk
    "risk": "the risk to control with one risk-controlled point per rule ('' = none)",
    "risk_delta": "the risk level the controlled thresholds must keep",
    "risk_epsilon": "the probability the guarantee may fail",
    "risk_nll_tolerance": "for risk 'nll_increase': the NLL increase (nats) counted as harm",
    "risk_batches": "the last N validation batches held out for risk control alone: 0 (share the sweep's "
    "validation batches, at least 2 of them) or at least 2",
    # measurement
    "timing_repeats": "timed repeats per point (the median is reported)",
    "timing_batches": "test batches each point's wall time covers (0 = all)",
    "count_flops": "where FLOPs are counted by running (the analytic count is everywhere)",
    "timing_points": "where wall time is measured",
    "plausible_ppl": "low high: perplexities outside are flagged in the checks",
    # runtime
    "name": "the run's name: its results, plots and report are named by it",
    "out": "the folder for results/, plots/, models/ and the report",
    "device": "cpu, cuda or cuda:N",
    "dtype": "the models' floating-point type",
    "threads": "torch CPU threads",
    "seed": "random seed of training and sampling",
}
