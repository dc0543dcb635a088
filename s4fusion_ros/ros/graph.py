"""The nodes behind the ROS graph's topic endpoints, named for log lines."""

# What rmw_dds_common names an endpoint's node before that node is discovered: the endpoint is
# discovered first, its participant's node names come later on ros_discovery_info (seconds
# later on a loaded machine).
UNKNOWN_NAMES = ('_NODE_NAME_UNKNOWN_', '_NODE_NAMESPACE_UNKNOWN_')


def node_known(info) -> bool:
    """Whether the graph knows the name of the node of `info` (a TopicEndpointInfo) yet."""
    return info.node_name not in UNKNOWN_NAMES and info.node_namespace not in UNKNOWN_NAMES


def node_of(info) -> str:
    """The full name of the node of `info` (a TopicEndpointInfo), or that it is not known yet."""
    if not node_known(info):
        return 'a node not yet discovered by name'
    return f'{info.node_namespace.rstrip("/")}/{info.node_name}'
