//go:build linux && conntrack_kernel

// Real-kernel tests of the series' netlink code (standalone module only; see
// kernel_helpers_kernel_test.go for the namespace guard). Each test uses its
// own frontend addresses in 198.18.0.0/15 so they share one fresh namespace.

package conntrack

import (
	"net/netip"
	"reflect"
	"syscall"
	"testing"
	"time"
)

var (
	kClients = netip.MustParseAddr("198.18.128.0")
	kPodA    = netip.MustParseAddr("198.18.64.1")
	kPodB    = netip.MustParseAddr("198.18.64.2")
	kPeer    = netip.MustParseAddr("198.19.0.1")
)

func TestKernelFilteredDump(t *testing.T) {
	vip := netip.MustParseAddr("198.18.0.10")
	other := netip.MustParseAddr("198.18.0.11")
	node := netip.MustParseAddr("198.18.3.1")
	v6vip := netip.MustParseAddr("2001:2::10")
	v6client := netip.MustParseAddr("2001:2::8000:1")
	v6pod := netip.MustParseAddr("2001:2::4000:1")
	var want []Flow
	for i := 0; i < 3; i++ {
		want = append(want, natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, i), 40000, vip, 53, kPodA, 5353))
	}
	noise := []Flow{
		natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, 10), 40000, vip, 54, kPodA, 5353),   // other port
		natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, 11), 40000, other, 53, kPodA, 5353), // other IP
		natFlow(syscall.IPPROTO_TCP, clientAddr(kClients, 12), 40000, vip, 53, kPodA, 5353),   // TCP
		natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, 13), 40000, node, 30053, kPodB, 5353),
		natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, 14), 40000, kPeer, 30053, kPeer, 30053),
	}
	insertFlows(t, syscall.AF_INET, append(append([]Flow{}, want...), noise...))
	insertFlows(t, syscall.AF_INET6, []Flow{natFlow(syscall.IPPROTO_UDP, v6client, 40000, v6vip, 53, v6pod, 5353)})

	dump := func(f DumpFilter) []Flow {
		var got []Flow
		if err := (kernelTable{}).dumpFlows(f, func(fl Flow) { got = append(got, fl) }); err != nil {
			t.Fatalf("dump %+v: %v", f, err)
		}
		sortFlows(got)
		return got
	}
	sortFlows(want)
	if got := dump(DumpFilter{Family: syscall.AF_INET, Proto: syscall.IPPROTO_UDP, OrigDst: vip, OrigDstPort: 53}); !reflect.DeepEqual(got, want) {
		t.Errorf("IP:port filter returned\n%v\nwant\n%v", got, want)
	}
	nodePort := []Flow{noise[3], noise[4]}
	sortFlows(nodePort)
	if got := dump(DumpFilter{Family: syscall.AF_INET, Proto: syscall.IPPROTO_UDP, OrigDstPort: 30053}); !reflect.DeepEqual(got, nodePort) {
		t.Errorf("port-only filter returned\n%v\nwant\n%v", got, nodePort)
	}
	if got := dump(DumpFilter{Family: syscall.AF_INET, Proto: syscall.IPPROTO_TCP, OrigDst: vip}); !reflect.DeepEqual(got, []Flow{noise[2]}) {
		t.Errorf("TCP filter returned %v, want %v", got, noise[2])
	}
	if got := dump(DumpFilter{Family: syscall.AF_INET, Proto: syscall.IPPROTO_UDP, OrigDst: netip.MustParseAddr("198.18.0.99"), OrigDstPort: 53}); len(got) != 0 {
		t.Errorf("filter for a frontend without entries returned %v", got)
	}
	v6 := dump(DumpFilter{Family: syscall.AF_INET6, Proto: syscall.IPPROTO_UDP, OrigDstPort: 53})
	if len(v6) != 1 || v6[0].Orig.Dst != v6vip || v6[0].Reply.Src != v6pod || v6[0].Reply.SrcPort != 5353 {
		t.Errorf("IPv6 filter returned %v", v6)
	}
	// The kernel filter and a full dump filtered in userspace agree.
	full := flowsMatching(t, syscall.AF_INET, func(fl Flow) bool {
		return fl.Proto == syscall.IPPROTO_UDP && fl.Orig.Dst == vip && fl.Orig.DstPort == 53
	})
	if !reflect.DeepEqual(full, want) {
		t.Errorf("full dump has %v for the frontend, want %v", full, want)
	}
}

func TestKernelBatchedDelete(t *testing.T) {
	vip := netip.MustParseAddr("198.18.0.20")
	const n = 2000 // many sendmsg batches
	var stale, keep []Flow
	for i := 0; i < n; i++ {
		stale = append(stale, natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, i), 41000, vip, 53, kPodA, 5353))
	}
	for i := 0; i < 5; i++ {
		keep = append(keep, natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, i), 41001, vip, 54, kPodA, 5353))
	}
	insertFlows(t, syscall.AF_INET, append(append([]Flow{}, stale...), keep...))
	ofVIP := func(fl Flow) bool { return fl.Orig.Dst == vip }
	if got := len(flowsMatching(t, syscall.AF_INET, ofVIP)); got != n+len(keep) {
		t.Fatalf("inserted %d entries, table has %d", n+len(keep), got)
	}
	// Entries that do not exist answer ENOENT: counted as gone, not an error.
	missing := []Flow{natFlow(syscall.IPPROTO_UDP, clientAddr(kClients, 9000), 41000, vip, 53, kPodA, 5353)}
	s, err := openCTNetlink()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	deleted, err := s.deleteFlows(syscall.AF_INET, append(append([]Flow{}, stale...), missing...))
	if err != nil || deleted != n {
		t.Fatalf("deleteFlows = %d, %v; want %d, nil", deleted, err, n)
	}
	sortFlows(keep)
	if got := flowsMatching(t, syscall.AF_INET, ofVIP); !reflect.DeepEqual(got, keep) {
		t.Fatalf("after delete the table has %v, want only %v", got, keep)
	}
	// Every one answers ENOENT now (error ACKs echo the request, so they are
	// the larger ones): still no error, nothing counted.
	deleted, err = s.deleteFlows(syscall.AF_INET, stale)
	if err != nil || deleted != 0 {
		t.Fatalf("deleting again = %d, %v; want 0, nil", deleted, err)
	}
	// A flow that cannot be encoded for the family is reported, and the rest
	// of the batch still runs.
	deleted, err = s.deleteFlows(syscall.AF_INET6, keep[:2])
	if err == nil || deleted != 0 {
		t.Errorf("v4 tuples sent as AF_INET6: deleteFlows = %d, %v; want an error", deleted, err)
	}
	deleted, err = s.deleteFlows(syscall.AF_INET, []Flow{keep[0], {Proto: syscall.IPPROTO_UDP, Orig: Tuple{Src: kPeer}}, keep[1]})
	if err == nil || deleted != 2 {
		t.Errorf("batch with one bad flow: deleteFlows = %d, %v; want 2 and an error", deleted, err)
	}
}

func TestKernelCleanerEndToEnd(t *testing.T) {
	vip := netip.MustParseAddr("198.18.0.30")
	other := netip.MustParseAddr("198.18.0.31") // another IP frontend on the NodePort's port number
	node := netip.MustParseAddr("198.18.3.30")
	fe := Frontend{IP: vip, Port: 53}
	otherFE := Frontend{IP: other, Port: 30030}
	nodeFE := Frontend{Port: 30030}
	c := func(i int) netip.Addr { return clientAddr(netip.MustParseAddr("198.18.200.0"), i) }

	var staleVIP, keepVIP []Flow
	for i := 0; i < 5; i++ {
		staleVIP = append(staleVIP, natFlow(syscall.IPPROTO_UDP, c(i), 42000, vip, 53, kPodA, 5353))
	}
	staleVIP = append(staleVIP, natFlow(syscall.IPPROTO_UDP, c(5), 42000, vip, 53, vip, 53)) // un-NATed: sent with no endpoints
	for i := 10; i < 13; i++ {
		keepVIP = append(keepVIP, natFlow(syscall.IPPROTO_UDP, c(i), 42000, vip, 53, kPodB, 5353))
	}
	staleNode := []Flow{natFlow(syscall.IPPROTO_UDP, c(20), 42000, node, 30030, kPodA, 5353)}
	keepNode := []Flow{natFlow(syscall.IPPROTO_UDP, c(21), 42000, node, 30030, kPodB, 5353)}
	// To the other IP frontend on the same port, served by kPodA: the
	// NodePort must not claim it.
	keepOther := []Flow{natFlow(syscall.IPPROTO_UDP, c(22), 42000, other, 30030, kPodA, 5353)}
	unrelated := []Flow{
		natFlow(syscall.IPPROTO_UDP, c(30), 42000, kPeer, 53, kPeer, 53),
		natFlow(syscall.IPPROTO_TCP, c(31), 42000, vip, 53, kPodA, 5353),
	}
	var all []Flow
	for _, fs := range [][]Flow{staleVIP, keepVIP, staleNode, keepNode, keepOther, unrelated} {
		all = append(all, fs...)
	}
	insertFlows(t, syscall.AF_INET, all)
	ours := func(fl Flow) bool { return fl.Orig.Src.As4()[1] == 18 && fl.Orig.Src.As4()[2] == 200 }

	req := CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{
		fe:      {netip.AddrPortFrom(kPodB, 5353): {}},
		nodeFE:  {netip.AddrPortFrom(kPodB, 5353): {}},
		otherFE: {netip.AddrPortFrom(kPodA, 5353): {}},
	}}

	// Off: nothing happens.
	if rep := newCleaner(kernelTable{}, CleanupPolicy{Mode: CleanupModeOff}).run(req); rep != (CleanupReport{}) {
		t.Errorf("Off mode did something: %+v", rep)
	}
	if got := len(flowsMatching(t, syscall.AF_INET, ours)); got != len(all) {
		t.Fatalf("Off mode: table has %d of our entries, want %d", got, len(all))
	}

	// Targeted with a budget of 4: 7 stale entries take two runs.
	cl := newCleaner(kernelTable{}, CleanupPolicy{Mode: CleanupModeTargeted, MaxDeletionsPerSync: 4})
	rep := cl.run(req)
	if rep.Errors != 0 || rep.Deleted != 4 || rep.Pending != 3 || rep.FrontendsChecked != 3 {
		t.Fatalf("first run: %+v", rep)
	}
	rep = cl.run(req)
	if rep.Errors != 0 || rep.Deleted != 3 || rep.Pending != 0 || rep.FrontendsChecked != 0 {
		t.Fatalf("second run (nothing changed, pending only): %+v", rep)
	}
	want := append(append(append(append([]Flow{}, keepVIP...), keepNode...), keepOther...), unrelated...)
	sortFlows(want)
	if got := flowsMatching(t, syscall.AF_INET, ours); !reflect.DeepEqual(got, want) {
		t.Fatalf("after cleanup the table has\n%v\nwant\n%v", got, want)
	}

	// The endpoint changes: kPodB stops serving the VIP, kPodA serves again.
	req.Frontends[fe] = Serving{netip.AddrPortFrom(kPodA, 5353): {}}
	rep = cl.run(req)
	if rep.Errors != 0 || rep.FrontendsChecked != 1 || rep.Deleted != len(keepVIP) {
		t.Fatalf("after endpoint change: %+v", rep)
	}
	// The service is deleted: its remaining entries go.
	insertFlows(t, syscall.AF_INET, []Flow{natFlow(syscall.IPPROTO_UDP, c(40), 42000, vip, 53, kPodA, 5353)})
	delete(req.Frontends, fe)
	rep = cl.run(req)
	if rep.Errors != 0 || rep.Deleted != 1 {
		t.Fatalf("after service deletion: %+v", rep)
	}
	want = append(append(append([]Flow{}, keepNode...), keepOther...), unrelated...)
	sortFlows(want)
	if got := flowsMatching(t, syscall.AF_INET, ours); !reflect.DeepEqual(got, want) {
		t.Fatalf("after deletion the table has\n%v\nwant\n%v", got, want)
	}

	// Reconcile re-checks every frontend each run and finds nothing more.
	rec := newCleaner(kernelTable{}, CleanupPolicy{Mode: CleanupModeReconcile})
	for i := 0; i < 2; i++ {
		rep = rec.run(req)
		if rep.Errors != 0 || rep.Deleted != 0 || rep.FrontendsChecked != 2 {
			t.Fatalf("reconcile run %d: %+v", i, rep)
		}
	}
}

func TestKernelAsyncCleaner(t *testing.T) {
	vip := netip.MustParseAddr("198.18.0.40")
	fe := Frontend{IP: vip, Port: 53}
	c := func(i int) netip.Addr { return clientAddr(netip.MustParseAddr("198.18.201.0"), i) }
	var stale []Flow
	for i := 0; i < 10; i++ {
		stale = append(stale, natFlow(syscall.IPPROTO_UDP, c(i), 43000, vip, 53, kPodA, 5353))
	}
	insertFlows(t, syscall.AF_INET, stale)
	reports := make(chan CleanupReport, 16)
	a := newAsyncCleaner(newCleaner(kernelTable{}, CleanupPolicy{Mode: CleanupModeTargeted, MaxDeletionsPerSync: 6}),
		func(_ CleanupRequest, r CleanupReport) { reports <- r })
	stop := make(chan struct{})
	defer close(stop)
	go a.Run(stop)
	a.Submit(CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{fe: {netip.AddrPortFrom(kPodB, 5353): {}}}})
	// Budget 6: the first run leaves 4 pending, the retry (1 s later, no new
	// request) deletes them.
	var total int
	deadline := time.After(10 * time.Second)
	for total < len(stale) {
		select {
		case r := <-reports:
			if r.Errors != 0 {
				t.Fatalf("run with errors: %+v", r)
			}
			total += r.Deleted
		case <-deadline:
			t.Fatalf("only %d of %d stale entries deleted after 10s", total, len(stale))
		}
	}
	if got := flowsMatching(t, syscall.AF_INET, func(fl Flow) bool { return fl.Orig.Dst == vip }); len(got) != 0 {
		t.Fatalf("entries left: %v", got)
	}
}
