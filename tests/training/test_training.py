"""Training one stage, hard-token collection, staged protocols, joint baselines, save/load."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cascade_bench import forward_cascade
from cascade_bench.data.prepare import prepare_data
from cascade_bench.routing.calibration import calibrate_thresholds
from cascade_bench.routing.evaluation import evaluate
from cascade_bench.stages.blocks import Block
from cascade_bench.stages.llm import LLM
from cascade_bench.stages.presets import build_ensemble
from cascade_bench.training.loops import TrainConfig, collect_hard_sequences, collect_hard_tokens, freeze, train_llm
from cascade_bench.training.persistence import load_ensemble, load_saved_tokenizer, save_ensemble
from cascade_bench.training.protocols import (
    PROTOCOLS,
    Protocol,
    decayed_lrs,
    start_ensemble,
    train_ensemble,
    train_joint_baseline,
    with_leaky_seed_protocol,
)

QUICK = dict(max_epochs=2, max_steps_per_epoch=6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(
        "embedded", tokenizer="bpe:320", seq_len=32, batch_size=8, cache_dir=tmp_path_factory.mktemp("tok")
    )


def _ensemble(data, layers=(1, 1), seed=0):
    return build_ensemble("gpt2-tiny", layers, vocab_size=len(data.tokenizer), seed=seed).eval()


def _stage0_ppl(ensemble, batches):
    return evaluate(ensemble, batches, method="full", num_stages=1).ppl


def test_training_lowers_validation_ppl_and_is_deterministic(data):
    runs = []
    for _ in range(2):
        ensemble = _ensemble(data)
        before = _stage0_ppl(ensemble, data.validation)
        history = train_llm(
            ensemble[0],
            data.train,
            lambda e=ensemble: _stage0_ppl(e, data.validation),
            TrainConfig(lr=3e-3, **QUICK),
            progress=False,
        )
        runs.append(history)
    assert runs[0].train_loss == runs[1].train_loss and runs[0].val_ppl == runs[1].val_ppl
    assert runs[0].best_val_ppl < 0.8 * before
    assert runs[0].steps == 12 and runs[0].tokens_per_s > 0


def test_early_stopping_restores_the_best_state(data):
    ensemble = _ensemble(data)
    ppls = iter([50.0, 40.0, 45.0, 46.0, 47.0])
    snapshots = []

    def validate():
        snapshots.append({k: v.clone() for k, v in ensemble[0].state_dict().items()})
        return next(ppls)

    history = train_llm(
        ensemble[0],
        data.train,
        validate,
        TrainConfig(lr=1e-3, max_epochs=5, patience=1, max_steps_per_epoch=2),
        progress=False,
    )
    assert history.val_ppl == (50.0, 40.0, 45.0) and history.best_epoch == 1  # patience 1: one bad epoch stops
    for name, value in ensemble[0].state_dict().items():
        assert torch.equal(value, snapshots[1][name])


def test_hard_tokens_are_exactly_the_routed_ones(data):
    ensemble = _ensemble(data)
    batches = data.validation[:3]
    calibrate_thresholds(ensemble, batches, 0.4)
    hard = collect_hard_tokens(ensemble, 1, batches)
    for batch, index, shard in zip(batches, hard.flat_indices, hard):
        with torch.inference_mode():
            out = forward_cascade(ensemble, batch["input_ids"], batch.get("attention_mask"), targets=batch["targets"])
            stage0 = ensemble[0](input_ids=batch["input_ids"]).hidden
        expected = (out.exit_stage.reshape(-1) == 1).nonzero().squeeze(1)
        assert torch.equal(index, expected)
        # By hand: shard row r holds, left-aligned and in order, the hard tokens of the r-th
        # sequence that has any; the rest of the row is padding with target -100.
        seq_len = batch["input_ids"].shape[1]
        per_sequence = {}
        for flat in index.tolist():
            per_sequence.setdefault(flat // seq_len, []).append(flat % seq_len)
        assert shard["inputs_embeds"].shape[0] == len(per_sequence)
        for row, (sequence, positions) in enumerate(sorted(per_sequence.items())):
            n = len(positions)
            torch.testing.assert_close(shard["inputs_embeds"][row, :n], stage0[sequence, positions])
            assert torch.equal(shard["targets"][row, :n], batch["targets"][sequence, positions])
            assert (shard["targets"][row, n:] == -100).all()
    assert hard.source_tokens == sum(b["input_ids"].numel() for b in batches) and hard.tokens_per_s > 0


def test_hard_tokens_spill_to_disk_over_the_budget(data, tmp_path):
    ensemble = _ensemble(data)
    calibrate_thresholds(ensemble, data.validation, 0.5)
    in_memory = collect_hard_tokens(ensemble, 1, data.validation)
    spilled = collect_hard_tokens(ensemble, 1, data.validation, memory_budget_bytes=0, spill_dir=tmp_path)
    assert in_memory.spilled == 0 and spilled.spilled == len(spilled) == len(in_memory)
    assert spilled.bytes_in_memory == 0 and len(list(tmp_path.glob("shard-*.pt"))) == len(spilled)
    for a, b in zip(in_memory, spilled):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_stage_is_unchanged_by_stage_one_training(data):
    ensemble = _ensemble(data)
    calibrate_thresholds(ensemble, data.validation, 0.5)
    hard = collect_hard_tokens(ensemble, 1, data.train[:6])
    before = {k: v.clone() for k, v in ensemble[0].state_dict().items()}
    stage1_before = {k: v.clone() for k, v in ensemble[1].state_dict().items()}
    freeze(ensemble.stages[:1])
    train_llm(
        ensemble[1],
        hard,
        lambda: evaluate(ensemble, data.validation).ppl,
        TrainConfig(lr=1e-3, max_epochs=1),
        progress=False,
    )
    assert all(not p.requires_grad for p in ensemble[0].parameters())
    assert all(torch.equal(v, before[k]) for k, v in ensemble[0].state_dict().items())
    assert any(not torch.equal(v, stage1_before[k]) for k, v in ensemble[1].state_dict().items())
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_llm(ensemble[0], data.train, lambda: 1.0, progress=False)


def _protocol(kind="block", **changes):
    values = dict(layers=(1, 1), lrs=(3e-3, 1e-3), patience=(1, 1), hard_ratio=0.5, max_epochs=2, stage_kind=kind)
    return Protocol("tiny-" + kind, **{**values, **changes})


def _start(data, protocol, seed=0):
    return start_ensemble(protocol, "gpt2-tiny", vocab_size=len(data.tokenizer), seed=seed)


@pytest.mark.parametrize("kind", ["block", "llm"])
def test_staged_protocol_end_to_end_and_save_load_round_trip(data, tmp_path, kind):
    protocol = _protocol(kind)
    ensemble = _start(data, protocol)
    report = train_ensemble(ensemble, data.train, data.validation, protocol, max_steps_per_epoch=5, progress=False)
    assert [type(stage) for stage in ensemble] == [Block if kind == "block" else LLM] * 2
    first, second = report.stages
    assert first.threshold_before is None and math.isfinite(second.threshold_before)
    assert ensemble[0].threshold == second.threshold_before
    assert second.validation.exit_ratios[0] == pytest.approx(0.5, abs=0.05)  # calibrated on validation
    assert 0 < second.hard_tokens < first.hard_tokens
    assert not any(p.requires_grad for p in ensemble[0].parameters())
    assert first.history.epochs == 2 and first.history.stop_reason == "epoch cap" and not first.history.converged

    save_ensemble(ensemble, tmp_path / "run", tokenizer=data.tokenizer, extra={"protocol": protocol.name})
    loaded = load_ensemble(tmp_path / "run")
    assert [type(stage) for stage in loaded] == [type(stage) for stage in ensemble]
    assert loaded.thresholds == ensemble.thresholds and math.isinf(loaded.thresholds[-1])
    batch = data.test[0]
    with torch.inference_mode():
        a = forward_cascade(ensemble, batch["input_ids"], targets=batch["targets"])
        b = forward_cascade(loaded, batch["input_ids"], targets=batch["targets"])
    assert torch.equal(a.exit_stage, b.exit_stage) and torch.equal(a.nll, b.nll)
    assert load_saved_tokenizer(tmp_path / "run")("def f():")["input_ids"] == data.tokenizer("def f():")["input_ids"]
    save_ensemble(loaded, tmp_path / "run")  # replacing an existing save
    assert load_ensemble(tmp_path / "run").thresholds == ensemble.thresholds


def test_grown_stage_exits_through_a_copy_of_the_trained_head_and_leaves_the_lower_model_alone(data, monkeypatch):
    """ASHEM/LEGO: the new block's head starts equal to the trained head but is its own parameter;
    the embedding exists once (block 0's) and nothing below the new block changes or gets a gradient."""
    import cascade_bench.training.protocols as protocols

    seen = {}
    original = protocols.train_llm

    def spy(stage, batches, validate, config, **kwargs):
        if stage is not ensemble[0]:  # the grown stage, just before it trains
            seen["head"] = {k: v.clone() for k, v in stage.head.state_dict().items()}
            seen["trained_head"] = {k: v.clone() for k, v in ensemble[0].head.state_dict().items()}
            seen["lower"] = {k: v.clone() for k, v in ensemble[0].state_dict().items()}
            seen["same_objects"] = [p is q for p in stage.head.parameters() for q in ensemble[0].head.parameters()]
        return original(stage, batches, validate, config, **kwargs)

    monkeypatch.setattr(protocols, "train_llm", spy)
    protocol = _protocol("block")
    ensemble = _start(data, protocol)
    train_ensemble(ensemble, data.train, data.validation, protocol, max_steps_per_epoch=4, progress=False)
    lower, grown = ensemble
    for name, value in seen["head"].items():
        assert torch.equal(value, seen["trained_head"][name]), name  # starts as the trained head
    assert not any(seen["same_objects"])  # ... in parameters of its own
    assert any(not torch.equal(v, seen["head"][k]) for k, v in grown.head.state_dict().items())  # and it trained
    for name, value in lower.state_dict().items():
        assert torch.equal(value, seen["lower"][name]), name  # embedding, layers, head: unchanged
    assert all(not p.requires_grad and p.grad is None for p in lower.parameters())
    vocab = len(data.tokenizer)
    embeddings = [m for m in ensemble.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == vocab]
    assert embeddings == [lower.embedding] and grown.embedding is None  # shared, not copied
    assert grown.head.lm_head.weight is not lower.embedding.weight
    assert lower.head.lm_head.weight is lower.embedding.weight  # stage 0 keeps GPT-2's tied head


@pytest.mark.parametrize("name", ["ashem", "lego-3", "cascade"])
def test_named_protocols_grow_the_kind_of_stage_the_seeds_grow(data, name):
    protocol = PROTOCOLS[name]
    ensemble = _start(data, protocol)
    assert len(ensemble) == 1 and ensemble.layers_per_stage == protocol.layers[:1]
    kind = Block if protocol.stage_kind == "block" else LLM
    assert isinstance(ensemble[0], kind)
    expected = ("llm", (1e-3, 5e-4), "cos_sim") if name == "cascade" else ("block", (1e-3, 1e-4), "max_prob")
    assert (protocol.stage_kind, protocol.lrs[:2], protocol.exit_rule) == expected
    assert protocol.patience[:2] == (1, 3)


def test_cascade_halves_the_lr_per_later_model_and_the_decay_is_checked():
    assert decayed_lrs(1e-3, 0.5, 3) == (1e-3, 5e-4, 2.5e-4)
    cascade = PROTOCOLS["cascade"]
    assert cascade.lr_decay == 0.5 and cascade.stage_config(1, seed=0).lr == 5e-4
    assert cascade.with_stages((2, 2, 2)).lrs == (1e-3, 5e-4, 2.5e-4)  # a third model keeps decaying
    with pytest.raises(ValueError, match="lr_decay 0.5 gives lrs \\(0.001, 0.0005\\)"):
        Protocol("bad", layers=(2, 2), lrs=(1e-3, 1e-4), patience=(1, 3), stage_kind="llm", lr_decay=0.5)
    with pytest.raises(ValueError, match="exit_head 'frozen' applies to block stages"):
        Protocol("bad", layers=(2, 2), lrs=(1e-3, 1e-4), patience=(1, 3), stage_kind="llm", exit_head="frozen")


def test_lego3_is_ashem_grown_by_one_more_stage_with_the_last_stages_recipe():
    assert dataclasses.replace(PROTOCOLS["ashem"].with_stages((2, 2, 2)), name="lego-3") == PROTOCOLS["lego-3"]
    assert PROTOCOLS["lego-3"].with_stages((2, 2)) == dataclasses.replace(PROTOCOLS["ashem"], name="lego-3")
    staged = dataclasses.replace(PROTOCOLS["lego-3"], hard_ratio=(0.5, 0.25))
    assert staged.boundary_hard_ratios == (0.5, 0.25) and staged.prefix(2).boundary_hard_ratios == (0.5,)
    assert PROTOCOLS["lego-3"].boundary_hard_ratios == (0.5, 0.5)
    with pytest.raises(ValueError, match="one per stage boundary \\(2 for 3 stages\\), got \\(0.5,\\)"):
        dataclasses.replace(PROTOCOLS["lego-3"], hard_ratio=(0.5,))


def test_staged_hard_ratios_set_each_boundary_on_the_tokens_that_reach_it(data):
    """LASH's falling thresholds: stage 0 leaves half of all tokens to continue, stage 1 a quarter of
    those that reach it."""
    protocol = _protocol(
        "block", layers=(1, 1, 1), lrs=(3e-3, 1e-3, 1e-3), patience=(1, 1, 1), hard_ratio=(0.5, 0.25), max_epochs=1
    )
    ensemble = _start(data, protocol)
    report = train_ensemble(ensemble, data.train, data.validation, protocol, max_steps_per_epoch=3, progress=False)
    final = report.stages[2].validation  # validation: the split the thresholds were calibrated on
    reached = final.tokens_entered
    assert reached[1] / reached[0] == pytest.approx(0.5, abs=0.03)
    assert reached[2] / reached[1] == pytest.approx(0.25, abs=0.03)


def test_frozen_exit_head_trains_only_the_new_layers_and_logs_hard_ppl_per_epoch(data):
    """The ASHEM stage spec: the grown block exits through the trained head, frozen; only its layers train.
    Every epoch of stage 1 logs the validation PPL and the PPL of the tokens past stage 0."""
    reports = {}
    for head in ("copy", "frozen"):
        protocol = _protocol("block", exit_head=head, max_epochs=2)
        ensemble = _start(data, protocol)
        report = train_ensemble(ensemble, data.train, data.validation, protocol, max_steps_per_epoch=4, progress=False)
        reports[head] = (ensemble, report.stages[1])
    (copied, copy_stage), (frozen, frozen_stage) = reports["copy"], reports["frozen"]
    lower, grown = frozen
    for name, value in grown.head.state_dict().items():
        assert torch.equal(value, lower.head.state_dict()[name]), name  # still the trained head
    assert all(not p.requires_grad for p in grown.head.parameters())
    layer_params = sum(p.numel() for p in grown.layers.parameters())
    assert frozen_stage.trainable_parameters == layer_params
    head_params = sum(p.numel() for p in copied[1].head.parameters())
    assert copy_stage.trainable_parameters == layer_params + head_params
    assert frozen_stage.parameters == sum(p.numel() for p in frozen.parameters())  # tied head counted once
    history = frozen_stage.history
    assert len(history.val_logged) == history.epochs and all("hard PPL" in e for e in history.val_logged)
    # the best epoch's logged hard PPL is that of the restored state, measured again here
    again = evaluate(frozen, data.validation, method="routed")
    assert history.val_logged[history.best_epoch]["hard PPL"] == pytest.approx(again.hard_ppl, rel=1e-6)
    assert history.val_ppl[history.best_epoch] == pytest.approx(again.ppl, rel=1e-6)
    assert history.summary()["val_logged"] == [dict(e) for e in history.val_logged]


def test_protocol_runs_are_deterministic(data):
    protocol = _protocol("block", layers=(1, 1, 1), lrs=(3e-3, 1e-3, 1e-3), patience=(1, 1, 1))
    runs = []
    for _ in range(2):
        ensemble = _start(data, protocol, seed=3)
        report = train_ensemble(
            ensemble, data.train, data.validation, protocol, seed=3, max_steps_per_epoch=3, progress=False
        )
        runs.append((report, {k: v.clone() for k, v in ensemble.state_dict().items()}))
    (a, state_a), (b, state_b) = runs
    for x, y in zip(a.stages, b.stages):
        assert x.history.train_loss == y.history.train_loss and x.history.val_ppl == y.history.val_ppl
        assert x.threshold_before == y.threshold_before and x.hard_tokens == y.hard_tokens
        assert x.validation.ppl == y.validation.ppl
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_continuing_from_a_saved_stage0_equals_one_uninterrupted_call(data, tmp_path):
    protocol = _protocol("block", layers=(1, 1, 1), lrs=(3e-3, 1e-3, 1e-3), patience=(1, 1, 1))
    whole = _start(data, protocol, seed=3)
    one_call = train_ensemble(
        whole, data.train, data.validation, protocol, seed=3, max_steps_per_epoch=3, progress=False
    )
    first = _start(data, protocol, seed=3)
    train_ensemble(
        first, data.train, data.validation, protocol.prefix(1), seed=3, max_steps_per_epoch=3, progress=False
    )
    save_ensemble(first, tmp_path / "stage0")
    resumed = load_ensemble(tmp_path / "stage0")
    rest = train_ensemble(
        resumed, data.train, data.validation, protocol, seed=3, max_steps_per_epoch=3, progress=False, trained_stages=1
    )
    assert [s.stage for s in rest.stages] == [1, 2]
    for x, y in zip(one_call.stages[1:], rest.stages):
        assert x.history.val_ppl == y.history.val_ppl and x.hard_tokens == y.hard_tokens
    expected = whole.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    with pytest.raises(ValueError, match="trained_stages=2\\), got stages of \\(1,\\) layers"):
        train_ensemble(_start(data, protocol), data.train, data.validation, protocol, trained_stages=2)
    with pytest.raises(ValueError, match="prefix needs 1..3, got 4"):
        protocol.prefix(4)


def test_leaky_seed_protocol_collects_from_validation(data):
    protocol = with_leaky_seed_protocol(_protocol("block", max_epochs=1))
    assert protocol.name == "tiny-block-leaky" and protocol.leaky_seed_protocol
    ensemble = _start(data, protocol)
    report = train_ensemble(ensemble, data.train, data.validation, protocol, max_steps_per_epoch=3, progress=False)
    routed_validation_hard = report.stages[1].validation.tokens_entered[1]
    assert report.stages[1].hard_tokens <= routed_validation_hard  # collected from validation itself


def test_joint_baselines_train_every_stage(data):
    for weights in ((0.0, 1.0), (0.5, 1.0)):
        ensemble = _ensemble(data)
        before = [{k: v.clone() for k, v in s.state_dict().items()} for s in ensemble]
        history = train_joint_baseline(
            ensemble,
            data.train,
            data.validation,
            weights,
            TrainConfig(lr=3e-3, max_epochs=1, max_steps_per_epoch=4),
            progress=False,
        )
        assert len(history.val_ppl) == 1
        for stage, old in zip(ensemble, before):
            assert any(not torch.equal(v, old[k]) for k, v in stage.state_dict().items())
    with pytest.raises(ValueError, match="layer_weights must be 2 non-negative numbers"):
        train_joint_baseline(ensemble, data.train, data.validation, (0.0, 0.0), progress=False)


def test_configuration_errors_name_the_value(data, tmp_path):
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        TrainConfig(patience=-2)
    with pytest.raises(ValueError, match="hard_ratio must be one number in \\(0, 1\\), or one per stage boundary"):
        Protocol("x", (1, 1), (1e-3, 1e-3), (1, 1), hard_ratio=1.0)
    with pytest.raises(ValueError, match="stage_kind must be one of \\['block', 'llm'\\], got 'tree'"):
        Protocol("x", (1, 1), (1e-3, 1e-3), (1, 1), stage_kind="tree")
    with pytest.raises(ValueError, match="pass stage 0 alone .* got stages of \\(1, 1\\) layers"):
        train_ensemble(_ensemble(data), data.train, data.validation, _protocol("llm"))
    with pytest.raises(TypeError, match="grows block stages \\(Block\\); got \\['LLM'\\]"):
        train_ensemble(_ensemble(data, layers=(1,)), data.train, data.validation, _protocol("block"))
    ensemble = _ensemble(data)
    ensemble[0].exit_rule = __import__("cascade_bench").resolve_exit_rule(lambda a, b, c: c.amax(-1))
    with pytest.raises(ValueError, match="neither a built-in .* nor a rule module"):
        save_ensemble(ensemble, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="no saved cascade"):
        load_ensemble(tmp_path)


def test_sequence_level_hard_examples_are_whole_sequences_below_the_threshold_in_mean(data):
    """The ASHEM seed's hard examples: a sequence is hard when its mean stage-0 confidence over scored
    tokens is below the token-level threshold; all its tokens, at their own positions, train stage 1."""
    ensemble = _ensemble(data)
    threshold = calibrate_thresholds(ensemble, data.validation, 0.5)[0]
    batches = data.train[:4]
    hard = collect_hard_sequences(ensemble, 1, batches, threshold)
    shards = iter(hard)
    for batch, means, rows in zip(batches, hard.mean_confidences, hard.flat_indices):
        with torch.inference_mode():
            out = forward_cascade(
                ensemble,
                batch["input_ids"],
                targets=batch["targets"],
                thresholds=[float("inf")],
                confidence_at_last_stage=True,
            )
            expected = out.stage_confidence[0].mean(dim=1)  # every token of a training window is scored
            states = ensemble[0](input_ids=batch["input_ids"]).hidden
        torch.testing.assert_close(means, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(rows, (expected < threshold).nonzero().flatten())
        if not len(rows):
            continue  # no shard for a batch without a hard sequence
        shard = next(shards)
        torch.testing.assert_close(shard["inputs_embeds"], states[rows], rtol=1e-5, atol=1e-5)
        assert torch.equal(shard["targets"], batch["targets"][rows])
    assert hard.num_tokens == sum(len(r) for r in hard.flat_indices) * batches[0]["targets"].shape[1]
    assert len(hard) == sum(len(r) > 0 for r in hard.flat_indices) > 0 and next(shards, None) is None

    protocol = _protocol("block", hard_examples="sequences", max_epochs=1)
    grown = _start(data, protocol)
    report = train_ensemble(grown, data.train, data.validation, protocol, max_steps_per_epoch=3, progress=False)
    selection = report.stages[1].selection
    assert 0 < selection["hard_sequences"] < selection["sequences"]
    assert selection["hard_mean_confidence"] < report.stages[1].threshold_before <= 1.0
    assert report.stages[1].hard_tokens == selection["hard_sequences"] * data.train[0]["targets"].shape[1]
    with pytest.raises(ValueError, match="hard_examples must be one of \\['tokens', 'sequences'\\], got 'rows'"):
        _protocol("block", hard_examples="rows")
    with pytest.raises(ValueError, match="hard_examples 'sequences' applies to staged training"):
        dataclasses.replace(PROTOCOLS["deep"], hard_examples="sequences")


def test_one_early_stopping_rule_keeps_the_best_epoch_and_stops_after_patience():
    """EarlyStopping, shared by fit, the memory streams and the relation benchmark: scores by hand."""
    from cascade_bench.training.loops import EarlyStopping

    layer = torch.nn.Linear(1, 1, bias=False)
    stopping = EarlyStopping([layer], patience=2)
    stops = []
    for epoch, score in enumerate([5.0, 4.0, 4.5, 4.6, 3.9]):
        with torch.no_grad():
            layer.weight.fill_(float(epoch))  # the weights of epoch e are e
        stops.append(stopping.update(score, epoch))
        if stops[-1]:
            break
    assert stops == [False, False, False, True]  # two epochs without improvement after epoch 1
    assert (stopping.best, stopping.best_epoch, stopping.stop_reason) == (4.0, 1, "early stopping")
    stopping.restore()
    assert layer.weight.item() == 1.0 and not layer.training
    # an improvement smaller than min_delta does not count
    strict = EarlyStopping([layer], patience=1, min_delta=0.5)
    assert strict.update(4.0, 0) is False and strict.update(3.8, 1) is True and strict.best_epoch == 0
    never = EarlyStopping([layer], patience=3)
    assert never.update(1.0, 0) is False and never.stop_reason == "epoch cap"


def test_one_step_loop_takes_every_step_validates_in_eval_mode_and_restores_the_best_epoch():
    """train_epochs, the step loop of fit, the memory streams and the relation benchmark, by hand:
    w starts at 0, loss = (w - 3)^2 with SGD lr 0.25 halves the distance to 3 each step."""
    from cascade_bench.training.loops import EarlyStopping, train_epochs

    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.25)
    seen = []

    def epoch_steps(epoch):
        for _ in range(2):  # two steps per epoch, 5 scored tokens each
            yield lambda: ((layer.weight[0, 0] - 3.0) ** 2, 5)

    def validate(epoch, stats):
        seen.append((epoch, layer.training, stats.steps, stats.tokens, layer.weight.item()))
        return [5.0, 4.0, 4.5, 4.6][epoch]  # best at epoch 1, then two epochs without improvement

    train_epochs([layer], optimizer, range(10), epoch_steps, validate, EarlyStopping([layer], patience=2))
    # w after each step: 1.5, 2.25 | 2.625, 2.8125 | ...; validated in eval mode after every epoch
    assert [s[:4] for s in seen] == [(e, False, 2, 10) for e in range(4)]
    assert [s[4] for s in seen[:2]] == [2.25, 2.8125]
    assert layer.weight.item() == 2.8125 and layer.weight.grad is None  # epoch 1's weights, no gradient kept
    clipped = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        clipped.weight.zero_()
    sgd = torch.optim.SGD(clipped.parameters(), lr=1.0)
    steps = lambda epoch: [lambda: ((clipped.weight[0, 0] - 3.0) ** 2, 1)]  # noqa: E731  gradient -6
    train_epochs([clipped], sgd, range(1), steps, lambda e, s: 0.0, EarlyStopping([clipped], 1), grad_clip=0.5)
    assert clipped.weight.item() == pytest.approx(
        0.5, abs=1e-6
    )  # the step of norm 6 clipped to 0.5 (clip_grad_norm_ adds 1e-6)
