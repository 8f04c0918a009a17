"""The method's training: routers and LoRA adapters on the frozen backbone (trainer), over the
step-typed data of layerroute_rt.data."""
