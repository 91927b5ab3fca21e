import pytest
import torch

from rl.ema import AdapterEMA


def test_decay_warms_up_as_diffusionnfts_ema():
    # flow_grpo/ema.py (DiffusionNFT): min((1 + s) / (10 + s), decay), s counted after the step's increment
    ema = AdapterEMA({"w": torch.zeros(2)}, decay=0.9)
    assert ema.current_decay(1) == pytest.approx(2 / 11)
    assert ema.current_decay(79) == pytest.approx(80 / 89)
    assert ema.current_decay(80) == ema.current_decay(500) == 0.9


def test_update_moves_towards_the_weights_by_one_minus_the_decay():
    params = {"w": torch.tensor([1.0, -2.0])}
    ema = AdapterEMA(params, decay=0.9)
    params["w"] += 10
    ema.update(params, 1)  # d = 2/11
    torch.testing.assert_close(ema.weights["w"], torch.tensor([1.0, -2.0]) + (9 / 11) * 10)
    ema.update(params, 100)  # d = 0.9
    torch.testing.assert_close(ema.weights["w"], torch.tensor([11.0, 8.0]) - 0.9 * (10 - (9 / 11) * 10))


def test_update_every_n_steps_as_flow_grpos_interval():
    # update when (s + 1) % every == 0: every 8 steps at s = 7, 15, ...
    params = {"w": torch.ones(1)}
    ema = AdapterEMA({"w": torch.zeros(1)}, decay=0.9, every=8)
    moved = []
    for step in range(1, 17):
        before = ema.weights["w"].clone()
        ema.update(params, step)
        moved.append(bool(ema.weights["w"] != before))
    assert [step for step, did in zip(range(1, 17), moved) if did] == [7, 15]


def test_swapped_into_runs_with_the_ema_and_restores_the_weights():
    params = {"w": torch.nn.Parameter(torch.tensor([3.0]))}
    ema = AdapterEMA({"w": torch.tensor([1.0])})
    with ema.swapped_into(params):
        assert params["w"].item() == 1.0
    assert params["w"].item() == 3.0
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped_into(params):
            raise RuntimeError("inside")
    assert params["w"].item() == 3.0


def test_state_round_trip_and_validation():
    ema = AdapterEMA({"w": torch.tensor([2.0])})
    other = AdapterEMA({"w": torch.tensor([0.0])})
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.weights["w"], torch.tensor([2.0]))
    with pytest.raises(KeyError, match="other parameters"):
        other.load_state_dict({"v": torch.zeros(1)})
    with pytest.raises(ValueError, match="decay"):
        AdapterEMA({}, decay=1.0)
