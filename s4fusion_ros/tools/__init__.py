from ..entry_points import set_up_for_python_m

set_up_for_python_m()
