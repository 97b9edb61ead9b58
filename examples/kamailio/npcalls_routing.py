"""KEMI routing script for examples/kamailio/kamailio.cfg.

A stateful, record-routing proxy that relays every request to its Request-URI
(it has no registrar and no location table: callers address the callee
directly, as ``sipp ... <callee> -rsa <proxy>`` does), keeps dialogs for
Kamailio's CDRs, accounts transactions with the acc module, and records every
answered call in an npcalls table:

* start: the 2xx reply of the initial INVITE, in the INVITE transaction's
  onreply route (so a call that is rejected, e.g. 486 Busy Here, or
  cancelled is never recorded as started);
* end: the BYE, once ``t_newtran()`` has created its transaction (so a
  retransmitted BYE is absorbed by tm and never reaches the table twice;
  start and stop are idempotent per Call-ID anyway).

Settings, read once from the environment in Kamailio's main process:

  NPCALLS_SITE       directories to add with site.addsitedir() (os.pathsep
                     separated), e.g. a virtualenv's site-packages: see README
  NPCALLS_TABLE      table name or path (default "calls": /dev/shm/npcalls.calls,
                     or $NPCALLS_DIR/npcalls.calls)
  NPCALLS_CAPACITY   slots of the table if it has to be created (default 65536)
  NPCALLS_KEY_WIDTH  longest Call-ID in bytes if created (default 128)
  NPCALLS_MODE       permission bits if created, octal (default 0600: only
                     Kamailio's user may read it; e.g. 0640 for a group)
  NPCALLS_RECORD     "0": route exactly the same way without recording
                     (the benchmark's baseline)
  NPCALLS_TRACE      "1": log one line per recorded start and stop
  NPCALLS_LOCK_WAIT_MS  longest wait for the table's writer lock (default 50);
                     past it the event waits in the worker's backlog
  NPCALLS_CONFIG     a file of NAME=value lines with the names above
                     (the environment wins); see npcalls.kamailio.read_settings
"""

import os
import site
import sys

# The embedded interpreter is Debian's Python 3.11 (libpython3.11), which does
# not know about virtualenvs: add the one holding npcalls.  addsitedir() (not a
# bare sys.path entry) also runs the .pth files an editable install relies on.
for _d in filter(None, os.environ.get("NPCALLS_SITE", "").split(os.pathsep)):
    if _d not in sys.path:
        site.addsitedir(_d)

import KSR  # noqa: E402  (provided by app_python3)

from npcalls.kamailio import CallMonitor, read_settings  # noqa: E402

FLT_ACC = 1         # acc: log the transaction when answered (log_flag)
FLT_ACCMISSED = 2   # acc: log missed calls (log_missed_flag)
FLT_ACCFAILED = 3   # acc: log failed transactions (failed_transaction_flag)


class kamailio:  # noqa: N801 - the class name app_python3 documents
    def __init__(self):
        self.calls = None
        if os.environ.get("NPCALLS_RECORD", "1") != "0":
            # Built in the main process, before Kamailio forks its workers:
            # the table is opened (created if needed) here, and each worker
            # re-opens its own handle in child_init (or at first use).
            # The same settings as the native script (read_settings: the
            # environment, or the file named by NPCALLS_CONFIG).
            s = read_settings()
            self.calls = CallMonitor(
                s["NPCALLS_TABLE"], capacity=s["NPCALLS_CAPACITY"],
                key_width=s["NPCALLS_KEY_WIDTH"], mode=s["NPCALLS_MODE"],
                trace=s["NPCALLS_TRACE"], lock_timeout=s["NPCALLS_LOCK_WAIT_MS"],
                max_pending=s["NPCALLS_MAX_PENDING"],
                stop_inserts_missing=s["NPCALLS_STOP_INSERTS_MISSING"],
            )

    def child_init(self, rank):
        if self.calls is not None:
            self.calls.child_init(rank)
        return 0

    # ------------------------------------------------------------------ requests

    def ksr_request_route(self, msg):
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return 1

        if KSR.siputils.has_totag() > 0:
            return self.route_in_dialog(msg)

        if KSR.is_CANCEL():
            if KSR.tm.t_check_trans() > 0:
                self.relay()
            return 1

        # Retransmission of a request whose transaction exists: absorbed by tm.
        if KSR.tm.t_check_trans() == 0:
            return 1

        if KSR.is_myself_ruri():
            # No registrar here: only answer keepalives addressed to the proxy.
            if KSR.is_OPTIONS():
                KSR.sl.sl_send_reply(200, "OK")
            else:
                KSR.sl.sl_send_reply(404, "Not Here")
            return 1

        if KSR.is_INVITE():
            # Before t_newtran(): acc and dialog hook into the transaction
            # when it is created, according to the flags set by then.
            KSR.rr.record_route()
            KSR.setflag(FLT_ACC)
            KSR.setflag(FLT_ACCMISSED)
            KSR.setflag(FLT_ACCFAILED)
            KSR.dialog.dlg_manage()

        if KSR.tm.t_newtran() <= 0:
            # 0: a retransmission caught here; < 0: no memory / bad message.
            return 1

        if KSR.is_INVITE():
            # Only the 2xx of this transaction starts the call (see below).
            KSR.tm.t_on_reply("ksr_onreply_invite")
        self.relay()
        return 1

    def route_in_dialog(self, msg):
        if KSR.rr.loose_route() < 0:
            # sipp's built-in uac/uas scenarios (and some other UAs) ignore
            # Record-Route: their ACK and BYE carry no Route header and
            # loose_route() fails.  The ACK of a non-2xx final reply (e.g. the
            # 486) is hop-by-hop and is absorbed here by tm.
            if KSR.is_ACK():
                if KSR.tm.t_check_trans() == 0:
                    return 1
            if KSR.is_myself_ruri():
                if not KSR.is_ACK():
                    KSR.sl.sl_send_reply(404, "Not Here")
                return 1
            # The Request-URI is the other party's Contact: relay it there,
            # and let the dialog module see it (loose_route did not).
            KSR.dialog.dlg_manage()

        if KSR.is_ACK():
            self.relay()            # ACK of a 2xx: end to end, stateless
            return 1

        if KSR.is_BYE():
            KSR.setflag(FLT_ACC)
            KSR.setflag(FLT_ACCFAILED)

        if KSR.tm.t_newtran() <= 0:
            return 1                # a retransmission (absorbed), or an error
        if self.calls is not None and KSR.is_BYE():
            self.calls.stop_monitoring(msg)
        self.relay()
        return 1

    def relay(self):
        if KSR.tm.t_relay() < 0:
            KSR.sl.sl_reply_error()

    # ------------------------------------------------------------------ replies

    def ksr_reply_route(self, msg):
        # Kamailio calls this for every reply it receives (it must exist).
        return 1

    def ksr_onreply_invite(self, msg):
        # Runs in whichever worker received the reply, before tm relays it.
        if self.calls is not None:
            code = KSR.pv.get("$rs")
            if code is not None and 200 <= int(code) < 300:
                self.calls.start_monitoring(msg)
        return 1


def mod_init():
    return kamailio()
