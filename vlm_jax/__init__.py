from vlm_jax import libtpu_env

libtpu_env.quiet_libtpu_without_tpus()
