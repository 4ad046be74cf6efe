"""Training-side loss modules: the state a loss carries through a run
(teacher-temperature schedule, centre buffer and its EMA, the centre
all-reduce, health statistics), around the functional kernels of
`dino_fast.kernels`."""
