"""Training machinery: state, optimizer, EMA, the jitted step, checkpoints, metrics."""
