//go:build linux && conntrack_kernel

// Kernel harness for the standalone module only (not part of the series):
// these tests talk to the real conntrack table, so they are behind the
// conntrack_kernel build tag and refuse to run anywhere but the network
// namespace named by CONNTRACK_KERNEL_NETNS, which patches/tests creates for
// them and deletes afterwards. Run them with patches/tests/test_kernel_go.py,
// never in the host namespace.

package conntrack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"syscall"
	"testing"
)

const ctaTimeout = 7

// TestMain refuses to run unless this process is inside the namespace the
// harness created (same inode as /run/netns/$CONNTRACK_KERNEL_NETNS) and that
// namespace is not the one the harness itself runs in
// ($CONNTRACK_KERNEL_HOST_NETNS_INODE) nor, when readable, PID 1's.
func TestMain(m *testing.M) {
	if err := checkNamespace(); err != nil {
		fmt.Fprintln(os.Stderr, "conntrack kernel tests:", err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

func nsInode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

func checkNamespace() error {
	name := os.Getenv("CONNTRACK_KERNEL_NETNS")
	hostIno, _ := strconv.ParseUint(os.Getenv("CONNTRACK_KERNEL_HOST_NETNS_INODE"), 10, 64)
	if name == "" || hostIno == 0 {
		return errors.New("CONNTRACK_KERNEL_NETNS / CONNTRACK_KERNEL_HOST_NETNS_INODE not set; run via patches/tests/test_kernel_go.py (ip netns exec)")
	}
	self, err := nsInode("/proc/self/ns/net")
	if err != nil {
		return err
	}
	want, err := nsInode("/run/netns/" + name)
	if err != nil {
		return err
	}
	if self != want {
		return fmt.Errorf("not inside netns %s", name)
	}
	if self == hostIno {
		return errors.New("refusing to run in the harness's own (host) network namespace")
	}
	if init, err := nsInode("/proc/1/ns/net"); err == nil && init == self {
		return errors.New("refusing to run in PID 1's network namespace")
	}
	return nil
}

// appendCreateRequest appends an IPCTNL_MSG_CT_NEW for fl (both tuples
// given explicitly, no NAT setup), with NLM_F_ACK.
func appendCreateRequest(b []byte, seq uint32, family uint8, fl Flow, timeout uint32) ([]byte, error) {
	tuple := func(t Tuple) ([]byte, error) {
		ip, err := ipAttrs(family, t.Src, t.Dst)
		if err != nil {
			return nil, err
		}
		proto := appendAttr(nil, ctaProtoNum, []byte{fl.Proto})
		proto = appendAttr(proto, ctaProtoSrcPort, be16(t.SrcPort))
		proto = appendAttr(proto, ctaProtoDstPort, be16(t.DstPort))
		return appendNested(appendNested(nil, ctaTupleIP, ip), ctaTupleProto, proto), nil
	}
	orig, err := tuple(fl.Orig)
	if err != nil {
		return b, err
	}
	reply, err := tuple(fl.Reply)
	if err != nil {
		return b, err
	}
	start := len(b)
	b = appendHeader(b, ipctnlMsgCtNew, syscall.NLM_F_REQUEST|syscall.NLM_F_ACK|syscall.NLM_F_CREATE|syscall.NLM_F_EXCL, seq, family)
	b = appendNested(b, ctaTupleOrig, orig)
	b = appendNested(b, ctaTupleReply, reply)
	b = appendAttr(b, ctaTimeout, binary.BigEndian.AppendUint32(nil, timeout))
	return finish(b, start), nil
}

// insertFlows creates flows in this namespace's table, a batch per sendmsg,
// and fails the test unless every one was created.
func insertFlows(t testing.TB, family uint8, flows []Flow) {
	t.Helper()
	s, err := openCTNetlink()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	buf := make([]byte, recvBufferSize)
	for start := 0; start < len(flows); {
		var batch []byte
		outstanding := map[uint32]bool{}
		for n := 0; start < len(flows) && n < deleteBatchRequests; n++ {
			seq := s.nextSeq()
			batch, err = appendCreateRequest(batch, seq, family, flows[start], 600)
			if err != nil {
				t.Fatal(err)
			}
			outstanding[seq] = true
			start++
		}
		if err := s.send(batch); err != nil {
			t.Fatal(err)
		}
		for reads := 0; len(outstanding) > 0 && reads <= len(flows); reads++ {
			b, err := s.recv(buf)
			if err != nil {
				t.Fatalf("reading create ACKs: %v", err)
			}
			msgs, err := splitMessages(b)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range msgs {
				if m.typ != syscall.NLMSG_ERROR || !outstanding[m.seq] {
					continue
				}
				delete(outstanding, m.seq)
				if e := errnoOf(m); e != 0 {
					t.Fatalf("creating conntrack entry: %v", e)
				}
			}
		}
		if len(outstanding) > 0 {
			t.Fatalf("%d create requests never acknowledged", len(outstanding))
		}
	}
}

// dumpAll reads this namespace's whole table for family without any
// CTA_FILTER, the way upstream's ListEntries (netlink.ConntrackTableList)
// does, decoding every entry with this series' decoder.
func dumpAll(family uint8, visit func(Flow)) error {
	s, err := openCTNetlink()
	if err != nil {
		return err
	}
	defer s.Close()
	req := finish(appendHeader(nil, ipctnlMsgCtGet, syscall.NLM_F_REQUEST|syscall.NLM_F_DUMP, s.nextSeq(), family), 0)
	if err := s.send(req); err != nil {
		return err
	}
	buf := make([]byte, recvBufferSize)
	for reads := 0; reads < 1<<24; reads++ {
		b, err := s.recv(buf)
		if err != nil {
			return err
		}
		done, err := decodeDumpBuffer(b, visit)
		if err != nil {
			return err
		}
		if done {
			return nil
		}
	}
	return errors.New("dump did not end")
}

// flowsMatching returns the flows of the whole table for which keep is true, sorted.
func flowsMatching(t testing.TB, family uint8, keep func(Flow) bool) []Flow {
	t.Helper()
	var out []Flow
	if err := dumpAll(family, func(fl Flow) {
		if keep(fl) {
			out = append(out, fl)
		}
	}); err != nil {
		t.Fatal(err)
	}
	sortFlows(out)
	return out
}

func sortFlows(fs []Flow) {
	key := func(f Flow) string {
		return fmt.Sprintf("%d %s %s", f.Proto, netip.AddrPortFrom(f.Orig.Src, f.Orig.SrcPort), netip.AddrPortFrom(f.Orig.Dst, f.Orig.DstPort))
	}
	sort.Slice(fs, func(i, j int) bool { return key(fs[i]) < key(fs[j]) })
}

// natFlow is a flow from src:sport to dst:dport DNATed to ep:epPort.
func natFlow(proto uint8, src netip.Addr, sport uint16, dst netip.Addr, dport uint16, ep netip.Addr, epPort uint16) Flow {
	return Flow{Proto: proto,
		Orig:  Tuple{Src: src, Dst: dst, SrcPort: sport, DstPort: dport},
		Reply: Tuple{Src: ep, Dst: src, SrcPort: epPort, DstPort: sport}}
}

// clientAddr is base + i (IPv4).
func clientAddr(base netip.Addr, i int) netip.Addr {
	v := base.As4()
	n := binary.BigEndian.Uint32(v[:]) + uint32(i)
	binary.BigEndian.PutUint32(v[:], n)
	return netip.AddrFrom4(v)
}
