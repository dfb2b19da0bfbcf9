def is_main_process():
    raise AssertionError("the script must not ask for ImageNet weights")
