"""The bodies of a round's stages: typed records in, the stage's ``...Info`` out, no Ray.

Each stage takes what runs on the cluster (a generator pool, the verifier pool, the SFT run, the
merge task) as an injected callable or protocol (:mod:`imm_ray.stages.ports`), so that the round
driver wires Ray in and a unit test passes in-memory fakes.
"""
