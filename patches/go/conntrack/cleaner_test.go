//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

import (
	"errors"
	"net/netip"
	"syscall"
	"testing"
)

// fakeTable applies DumpFilter the way the kernel's CTA_FILTER does.
type fakeTable struct {
	flows     map[Flow]bool
	dumps     int
	deletes   int
	failDumps map[Frontend]bool
	failDel   bool
}

func (f *fakeTable) dumpFlows(flt DumpFilter, visit func(Flow)) error {
	f.dumps++
	if f.failDumps[Frontend{IP: flt.OrigDst, Port: flt.OrigDstPort}] {
		return errors.New("injected dump failure")
	}
	for fl := range f.flows {
		if fl.Proto == flt.Proto && (!flt.OrigDst.IsValid() || fl.Orig.Dst == flt.OrigDst) && (flt.OrigDstPort == 0 || fl.Orig.DstPort == flt.OrigDstPort) {
			visit(fl)
		}
	}
	return nil
}

func (f *fakeTable) deleteFlows(_ uint8, flows []Flow) (int, error) {
	f.deletes++
	if f.failDel {
		return 0, errors.New("injected delete failure")
	}
	n := 0
	for _, fl := range flows {
		if f.flows[fl] {
			delete(f.flows, fl)
			n++
		}
	}
	return n, nil
}

var (
	dnsVIP  = netip.MustParseAddr("198.18.0.10")
	nodeIP  = netip.MustParseAddr("198.18.3.1")
	client  = netip.MustParseAddr("198.18.1.2")
	oldPod  = netip.MustParseAddr("198.18.2.7")
	newPod  = netip.MustParseAddr("198.18.2.8")
	dnsFE   = Frontend{IP: dnsVIP, Port: 53}
	nodePFE = Frontend{Port: 30053}
)

func udp(dst netip.Addr, dport uint16, replySrc netip.Addr, rport uint16, sport uint16) Flow {
	return Flow{Proto: syscall.IPPROTO_UDP,
		Orig:  Tuple{Src: client, Dst: dst, SrcPort: sport, DstPort: dport},
		Reply: Tuple{Src: replySrc, Dst: client, SrcPort: rport, DstPort: sport}}
}

func serving(aps ...netip.AddrPort) Serving {
	s := Serving{}
	for _, ap := range aps {
		s[ap] = struct{}{}
	}
	return s
}

func TestCleanerStaleOnly(t *testing.T) {
	live := udp(dnsVIP, 53, newPod, 53, 1000)
	stale := udp(dnsVIP, 53, oldPod, 53, 1001)
	wrongPort := udp(dnsVIP, 53, newPod, 5353, 1002)
	otherPort := udp(dnsVIP, 54, oldPod, 53, 1003) // not a frontend: never touched
	tcp := udp(dnsVIP, 53, oldPod, 53, 1004)
	tcp.Proto = syscall.IPPROTO_TCP // TCP is never touched
	nodePortStale := udp(nodeIP, 30053, oldPod, 53, 1005)
	nodePortLive := udp(nodeIP, 30053, newPod, 53, 1006)
	vipOnNodePortNumber := udp(dnsVIP, 30053, newPod, 99, 1007) // judged by its own IP frontend
	table := &fakeTable{flows: map[Flow]bool{live: true, stale: true, wrongPort: true, otherPort: true, tcp: true,
		nodePortStale: true, nodePortLive: true, vipOnNodePortNumber: true}}
	req := CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{
		dnsFE:                     serving(netip.AddrPortFrom(newPod, 53)),
		nodePFE:                   serving(netip.AddrPortFrom(newPod, 53)),
		{IP: dnsVIP, Port: 30053}: serving(netip.AddrPortFrom(newPod, 99)),
	}}
	rep := newCleaner(table, CleanupPolicy{}).run(req)
	for fl, want := range map[Flow]bool{live: true, stale: false, wrongPort: false, otherPort: true, tcp: true,
		nodePortStale: false, nodePortLive: true, vipOnNodePortNumber: true} {
		if table.flows[fl] != want {
			t.Errorf("flow %+v present=%v, want %v", fl, table.flows[fl], want)
		}
	}
	if rep.Deleted != 3 || rep.Errors != 0 || rep.Pending != 0 || table.deletes != 1 {
		t.Errorf("report %+v, delete calls %d", rep, table.deletes)
	}
}

func TestCleanerZeroEndpointsAndDeletedServices(t *testing.T) {
	noEndpoints := udp(dnsVIP, 53, dnsVIP, 53, 2000) // non-DNAT entry made while the service had no endpoints
	table := &fakeTable{flows: map[Flow]bool{noEndpoints: true}}
	c := newCleaner(table, CleanupPolicy{Mode: CleanupModeTargeted})
	c.run(CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{dnsFE: {}}})
	if table.flows[noEndpoints] {
		t.Errorf("entry to a frontend with zero endpoints survived")
	}
	dnat := udp(dnsVIP, 53, oldPod, 53, 2001)
	table.flows[dnat] = true
	rep := c.run(CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{}}) // service deleted
	if table.flows[dnat] || rep.FrontendsChecked != 1 {
		t.Errorf("entry of a deleted service survived (report %+v)", rep)
	}
	if _, ok := c.cleaned[dnsFE]; ok {
		t.Errorf("a deleted frontend must be forgotten once cleaned")
	}
}

func TestCleanerTargetedSkipsUnchangedAndRetriesFailures(t *testing.T) {
	table := &fakeTable{flows: map[Flow]bool{}, failDumps: map[Frontend]bool{dnsFE: true}}
	c := newCleaner(table, CleanupPolicy{Mode: CleanupModeTargeted})
	req := CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{dnsFE: serving(netip.AddrPortFrom(newPod, 53)), nodePFE: serving()}}
	if rep := c.run(req); rep.Errors != 1 || rep.FrontendsChecked != 2 {
		t.Fatalf("first run %+v", rep)
	}
	table.failDumps = nil
	if rep := c.run(req); rep.FrontendsChecked != 1 {
		t.Errorf("only the failed frontend must be retried, report %+v", rep)
	}
	if rep := c.run(req); rep.FrontendsChecked != 0 {
		t.Errorf("nothing changed, nothing to check; report %+v", rep)
	}
	reconcile := newCleaner(table, CleanupPolicy{Mode: CleanupModeReconcile})
	reconcile.run(req)
	if rep := reconcile.run(req); rep.FrontendsChecked != 2 {
		t.Errorf("reconcile checks every frontend every run, report %+v", rep)
	}
	if rep := newCleaner(table, CleanupPolicy{Mode: CleanupModeOff}).run(req); rep != (CleanupReport{}) {
		t.Errorf("off must do nothing, report %+v", rep)
	}
}

func TestCleanerBudgetCarriesOverAndRechecks(t *testing.T) {
	table := &fakeTable{flows: map[Flow]bool{}}
	for i := 0; i < 10; i++ {
		table.flows[udp(dnsVIP, 53, oldPod, 53, uint16(3000+i))] = true
	}
	c := newCleaner(table, CleanupPolicy{Mode: CleanupModeTargeted, MaxDeletionsPerSync: 4})
	req := CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{dnsFE: serving(netip.AddrPortFrom(newPod, 53))}}
	var deleted []int
	for run := 0; run < 5 && len(table.flows) > 0; run++ {
		rep := c.run(req)
		if rep.Deleted > 4 {
			t.Fatalf("run %d deleted %d entries, budget is 4", run, rep.Deleted)
		}
		deleted = append(deleted, rep.Deleted)
	}
	if len(table.flows) != 0 || len(deleted) != 3 {
		t.Errorf("deleted per run %v, %d left", deleted, len(table.flows))
	}
	// An entry carried over becomes non-stale when its endpoint serves again.
	for i := 0; i < 6; i++ {
		table.flows[udp(dnsVIP, 53, oldPod, 53, uint16(4000+i))] = true
	}
	c.cleaned = map[Frontend]string{}
	c.run(req)
	back := CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{dnsFE: serving(netip.AddrPortFrom(oldPod, 53))}}
	if rep := c.run(back); rep.Deleted != 0 || rep.Pending != 0 || len(table.flows) != 2 {
		t.Errorf("carried entries must be re-checked: report %+v, %d left", rep, len(table.flows))
	}
}

func TestCleanerDeleteFailureIsRetried(t *testing.T) {
	stale := udp(dnsVIP, 53, oldPod, 53, 5000)
	table := &fakeTable{flows: map[Flow]bool{stale: true}, failDel: true}
	c := newCleaner(table, CleanupPolicy{Mode: CleanupModeTargeted})
	req := CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{dnsFE: serving(netip.AddrPortFrom(newPod, 53))}}
	if rep := c.run(req); rep.Errors != 1 || rep.Pending != 1 {
		t.Fatalf("report %+v", rep)
	}
	table.failDel = false
	if rep := c.run(req); rep.Deleted != 1 || table.flows[stale] {
		t.Errorf("pending entry not retried: %+v", rep)
	}
}

func TestCleanupPolicyValidate(t *testing.T) {
	for _, tc := range []struct {
		p     CleanupPolicy
		valid bool
	}{
		{CleanupPolicy{}, true},
		{CleanupPolicy{Mode: CleanupModeTargeted, MaxDeletionsPerSync: 1000}, true},
		{CleanupPolicy{Mode: CleanupModeOff}, true},
		{CleanupPolicy{Mode: "Sometimes"}, false},
		{CleanupPolicy{Mode: CleanupModeReconcile, MaxDeletionsPerSync: -1}, false},
	} {
		if err := tc.p.Validate(); (err == nil) != tc.valid {
			t.Errorf("%+v: err=%v, want valid=%v", tc.p, err, tc.valid)
		}
	}
}
