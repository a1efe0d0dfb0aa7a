"""C doubles of the Rockchip runtime libraries and the code that compiles them."""
