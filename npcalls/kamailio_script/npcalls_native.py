"""npcalls call monitoring for a native kamailio.cfg, loaded by Kamailio's app_python3.

Nothing to edit here: settings come from the environment (or the file named by
$NPCALLS_CONFIG), see ``npcalls.kamailio.read_settings``.  In kamailio.cfg::

    loadmodule "app_python3.so"
    modparam("app_python3", "load", "/path/printed/by/npcalls-kamailio-script")
    ...
    python_exec("start_monitoring");                   # 2xx of the INVITE: $ci
    python_exec("stop_monitoring");                    # the BYE: $ci
    python_exec("start_monitoring", "$dlg(callid)");   # event_route[dialog:start]
    python_exec("stop_monitoring", "$dlg(callid)");    # event_route[dialog:end]

``NPCALLS_SITE`` (os.pathsep-separated directories, e.g. a Python 3.11
virtualenv's site-packages) is added with site.addsitedir() first, for
Kamailio's embedded interpreter to find npcalls, numpy and xxhash.
"""

import os
import site
import sys

for _d in filter(None, os.environ.get("NPCALLS_SITE", "").split(os.pathsep)):
    if _d not in sys.path:
        site.addsitedir(_d)

try:
    import npcalls.kamailio  # noqa: F401
except ImportError:
    # This file lives in npcalls/kamailio_script/: the directory holding the
    # npcalls package is two levels up (a source checkout, or site-packages
    # of an interpreter whose dependencies are already on the path).
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from npcalls.kamailio import script_from_environ  # noqa: E402


def mod_init():
    return script_from_environ()
