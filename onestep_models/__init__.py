"""onestep_models: one-step image generators on onestep_kernels (DiT, SLT, Direct Models,
SlimFlow, the flow-matching core and the trainer). Nothing is here yet: the models arrive with
the fused DiT block (see the project's issues)."""
