from qlora_ray.cli import main

main()
