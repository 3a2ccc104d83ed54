"""moto's server for drover's AWS tests, with one fix applied first.

moto (5.x) stores the user-data of CreateLaunchTemplateVersion undecoded, unlike
CreateLaunchTemplate, and then fails every launch from such a version (an AssertionError,
HTTP 500). Real EC2 has no such problem. This wrapper parses it the way CreateLaunchTemplate
does, then runs moto's own server with the same arguments (`-H HOST -p PORT`).
"""
import sys

from moto.ec2.models.launch_templates import LaunchTemplate
from moto.ec2.utils import parse_user_data
from moto.core.types import Base64EncodedString

_create_version = LaunchTemplate.create_version


def create_version(self, data, description):
    user_data = data.get("UserData")
    if user_data is not None and not isinstance(user_data, Base64EncodedString):
        data["UserData"] = parse_user_data(user_data)
    return _create_version(self, data, description)


LaunchTemplate.create_version = create_version

from moto.server import main  # noqa: E402

main(sys.argv[1:])
