from sgl_jax.router.server import main

main()
