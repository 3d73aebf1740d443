from overnight.config import build_config
from overnight.train.stopping import EarlyStopping


def stopper(*sets):
    return EarlyStopping(build_config(None, {}, list(sets)).early_stopping)


def test_state_roundtrip_continues_identically():
    a = stopper("early_stopping.patience=3", "early_stopping.warmup_steps=0", "early_stopping.check_every_steps=1")
    a.after_step(1, 2.0, 1.0)
    a.check_plateau(1, 2.0)
    a.check_plateau(2, 2.0)
    a.check_plateau(3, 2.0)
    b = stopper("early_stopping.patience=3", "early_stopping.warmup_steps=0", "early_stopping.check_every_steps=1")
    b.restore(a.state())
    assert b.state() == a.state()
    assert a.check_plateau(4, 2.0).code == b.check_plateau(4, 2.0).code == "plateau"


def test_improvement_below_min_delta_does_not_count():
    s = stopper("early_stopping.patience=2", "early_stopping.min_delta=0.1")
    assert s.check_plateau(100, 2.0) is None
    assert s.check_plateau(150, 1.95) is None  # only 0.05 better: a bad check
    assert s.check_plateau(200, 1.5) is None  # real improvement resets
    assert s.bad_checks == 0


def test_checks_start_after_warmup():
    s = stopper("early_stopping.warmup_steps=50", "early_stopping.check_every_steps=25")
    assert not s.check_due(50) and s.check_due(75) and not s.check_due(80)
    assert not stopper("early_stopping.enabled=false").check_due(100)


def test_spike_needs_consecutive_steps():
    s = stopper("early_stopping.grad_spike_threshold=10", "early_stopping.grad_spike_patience=2")
    assert s.after_step(1, 1.0, 50.0) is None
    assert s.after_step(2, 1.1, 5.0) is None  # the run of spikes is broken
    assert s.after_step(3, 1.2, 50.0) is None
    assert s.after_step(4, 1.3, 50.0).code == "grad_spike"


def test_non_finite_stops_even_when_disabled():
    s = stopper("early_stopping.enabled=false")
    assert s.after_step(1, float("inf"), 1.0).code == "non_finite"
