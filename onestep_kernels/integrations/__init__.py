"""Adapters that put onestep's fused ops into third-party models (diffusers)."""
